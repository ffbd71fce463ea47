#!/usr/bin/env bash
# Everything a lent GPU session needs, in one device call (see README "On a GPU"):
# build calm_fast there (nothing built on the CPU box loads there), run the test suite on the
# GPU (CUDA and Triton kernels against the reference), then the op microbenchmarks and the
# end-to-end CALM benchmark. Logs and results go to $OUT (the device tool brings them back);
# copy them into benchmarks/results/ and commit.
#   open_clip is not on the GPU image: carry its wheels in .whl/ (see README).
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu-session}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PY=python3
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$OUT/device.txt"
SECONDS=0
$PY setup.py build_ext --inplace 2>&1 | tail -5 | tee "$OUT/build.log" || exit 1
echo "build: ${SECONDS}s"
$PY -m pytest -q -x tests -k "cuda or merge or integration" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
$PY benchmarks/bench_ops.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_ops.log" | tail -40
$PY benchmarks/e2e_calm.py --config vit-l --out "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -30
echo "total: ${SECONDS}s"
