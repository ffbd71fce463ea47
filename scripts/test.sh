#!/usr/bin/env bash
# From a fresh clone: install pinned dependencies, build calm_fast, run every test.
#  1. .venv (CPU torch): editable build of the C++ kernels, CMake build of the same sources,
#     then the whole test suite (C++ kernels, Triton kernels under TRITON_INTERPRET=1), then the
#     tests of tensors over 2**31 elements when 16 GiB of memory is available.
#  2. .venv-cuda (torch 2.14.1+cu130) and .venv-cuda-min (torch 2.11.0+cu130), when nvcc is
#     present: builds and links the CUDA kernels for sm_90 against each and checks each op has a
#     CUDA kernel registered. GPU runtime tests run only on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }
# pip's "Location ... is ignored" notes about this machine's local indexes are noise
pip_install() { local venv=$1; shift; "$venv/bin/pip" install -q "$@" 2> >(grep -v "is ignored" >&2); }
# run quietly, print the log only when it fails
logged() { local log=$1; shift; "$@" >"$log" 2>&1 || { cat "$log"; return 1; }; }
mkdir -p build

step "CPU environment"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install .venv -r requirements/cpu.txt
pip_install .venv --no-deps -r requirements/bench-cpu.txt
pip_install .venv --no-deps -r requirements/hf.txt  # the hf extra: transformers for tests/test_hf_clip.py
logged build/cpu-build.log pip_install .venv --no-build-isolation --no-deps -e .

step "CMake build of the native modules (CPU)"
logged build/cmake-configure.log cmake -S . -B build/cmake -DPython_EXECUTABLE="$PWD/.venv/bin/python" \
  -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
logged build/cmake-build.log cmake --build build/cmake -j 2

# Build and link the CUDA kernels against a CUDA torch (no GPU needed) and check every op has a
# CUDA kernel registered; run from tests/ so that the installed package, not the tree, is imported.
cuda_build_check() {
  local venv=$1 requirements=$2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  pip_install "$venv" -r "$requirements"
  logged "build/${venv#.}-build.log" pip_install "$venv" --no-build-isolation --no-deps .
  (cd tests && CALM_FAST_REQUIRE_CUDA_BUILD=1 "../$venv/bin/pytest" -q -p no:cacheprovider test_torch_integration.py)
}

if [ -x "$CUDA_HOME/bin/nvcc" ]; then
  step "CUDA build (nvcc sm_${TORCH_CUDA_ARCH_LIST/./}) against torch 2.14.1+cu130, link and registration check"
  cuda_build_check .venv-cuda requirements/cuda.txt
  step "the same against torch 2.11.0+cu130 (the oldest supported, the GPU machines')"
  cuda_build_check .venv-cuda-min requirements/cuda-min.txt
else
  echo "nvcc not found under $CUDA_HOME: CUDA builds skipped"
fi

step "test suite"
.venv/bin/pytest -q tests "$@"

# Tensors over 2**31 elements (CPU kernels): ~13 GiB peak, so only with 16 GiB available. Huge
# pages for torch's large CPU tensors (THP_MEM_ALLOC_ENABLE): ~0.1 M page faults instead of ~8 M.
step "large tensors (> 2^31 elements)"
mem_available_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if [ "${mem_available_kib:-0}" -ge $((16 * 1024 * 1024)) ]; then
  THP_MEM_ALLOC_ENABLE=1 .venv/bin/pytest -q --large -m large tests/test_large_tensors.py
else
  echo "MemAvailable is $((${mem_available_kib:-0} / 1024)) MiB, under 16 GiB: large-tensor tests skipped"
fi
step "done"
