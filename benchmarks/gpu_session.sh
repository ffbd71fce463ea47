#!/usr/bin/env bash
# A lent GPU session, planned around the device tool's limits (10 min per call, 30 min of device
# time per session, 64 MiB carried per call; the machine keeps what a call left only while it
# stays warm, 30 s after a call). Nothing built here loads there (other torch), so it builds there.
#
#   here, once:  bash benchmarks/gpu_session.sh prepare   # open_clip wheels + the quality data packs
#   device call 1: bash benchmarks/gpu_session.sh core      carry: .whl .device-carry/quality-1
#                  build, GPU tests (CUDA + Triton against the reference), op microbenchmarks
#   device call 2: bash benchmarks/gpu_session.sh e2e       carry: .whl .device-carry/quality-2
#                  end-to-end CALM: ViT-L-14 (a, b, c, shortened schedule) and ViT-H-14 (c, bf16)
#   device call 3: bash benchmarks/gpu_session.sh quality   carry: nothing (the packs are there)
#                  the quality benchmark at full size (needs both packs: calls 1-3 back to back)
#
# Each stage builds first if the extension is missing (a machine that went cold), writes logs and
# results to $OUT (8 files at most per call), and caps each step with `timeout` so that one slow
# step leaves the next one its time. Copy what comes back into benchmarks/results/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:?usage: gpu_session.sh prepare|pack|unpack|core|e2e|quality}"
OUT="${OUT:-benchmarks/results/gpu-session}"
CARRY=${CALM_FAST_DEVICE_CARRY:-.device-carry}
QUALITY_CACHE=${CALM_FAST_DEVICE_CACHE:-/tmp/calm-fast-quality}
PY=python3
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1

# Wheels the GPU image lacks (everything else calm_fast needs is there; see device KINDS.md),
# at the versions pinned for the benchmarks.
mapfile -t WHEELS < <(grep -E '^(open_clip_torch|ftfy|wcwidth)==' requirements/bench-cpu.txt)

prepare() {  # here, with the registries: wheels into .whl/, then the quality data packs
  ${PYTHON:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" \
    || return 1
  ${PYTHON:-.venv/bin/python} scripts/fetch_quality_data.py || return 1
  pack
}

pack() {  # the quality cache (data, model code, shared subsets) as one xz stream in two carried halves
  local py=${PYTHON:-.venv/bin/python} cache shared stream="$CARRY/quality.tar.xz"
  cache=$($py -c "from benchmarks.quality.data import cache_dir; print(cache_dir())") || return 1
  shared=$($py -c "from benchmarks.quality.data import shared_data_dir; print(shared_data_dir())") || return 1
  rm -rf "$CARRY" && mkdir -p "$CARRY/quality-1" "$CARRY/quality-2"
  # the shared subsets go under data/ beside the cache's own files
  tar -cf - -C "$cache" data/mnist.npz data/fashion_mnist.npz site \
      -C "$shared" --transform 's,^\(cifar10\|gtsrb\)_subset,data/&,' cifar10_subset.npz gtsrb_subset.npz \
    | xz -T0 -6 > "$stream" || return 1
  sha256sum "$stream" | cut -d' ' -f1 > "$CARRY/quality-1/sha256"
  split -n 2 -d "$stream" "$CARRY/part."
  mv "$CARRY/part.00" "$CARRY/quality-1/" && mv "$CARRY/part.01" "$CARRY/quality-2/" && rm "$stream"
  du -sh "$CARRY"/quality-*
}

unpack() {  # both halves -> $QUALITY_CACHE (cache layout: data/, site/)
  local parts=("$CARRY"/quality-1/part.* "$CARRY"/quality-2/part.*)
  if [ ! -f "$CARRY/quality-1/sha256" ] || [ ! -f "${parts[0]}" ] || [ ! -f "${parts[1]}" ]; then
    echo "quality: both data packs must be on the machine ($CARRY/quality-1 from the core call," \
         "$CARRY/quality-2 from the e2e call, back to back while it stays warm)"; return 1
  fi
  if [ "$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)" != "$(cat "$CARRY/quality-1/sha256")" ]; then
    echo "quality: the data packs do not fit together (run pack again and carry both)"; return 1
  fi
  mkdir -p "$QUALITY_CACHE" && cat "${parts[@]}" | xz -d | tar -x -C "$QUALITY_CACHE"
}

device_setup() {  # on the device: carried wheels, device facts, the extension built there
  mkdir -p "$OUT"
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/device.txt"
  if ! $PY -c "import calm_fast, sys; sys.exit(not calm_fast._extension.NATIVE_CUDA)" 2>/dev/null; then
    local t0=$SECONDS
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    echo "build: $((SECONDS - t0))s" | tee -a "$OUT/device.txt"
  fi
}

step() {  # step SECONDS LOG command...: capped, appended to $OUT/LOG, tail shown; returns its exit code
  local limit=$1 log=$2 t0=$SECONDS rc; shift 2
  echo "\$ $*" >> "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  echo "[$log] exit $rc after $((SECONDS - t0))s"; tail -25 "$OUT/$log"
  return $rc
}

core() {
  device_setup
  step 200 tests.log $PY -m pytest -q -p no:cacheprovider -n 8 tests -k cuda
  step 260 bench_ops.log $PY benchmarks/bench_ops.py --device cuda --out "$OUT"
}

e2e() {
  device_setup
  # Shortened schedules (the full one is projected by the script): 3 updates per sequential step.
  # ViT-L at batch 128 in fp32: ~49 GiB of activations (389 MiB per image, measured on the CPU).
  step 360 e2e_vit_l.log $PY benchmarks/e2e_calm.py --config vit-l --updates 3 --tf32 --out "$OUT"
  # ViT-H at batch 128: ~40 GiB of bf16 activations (measured on the CPU: 323 MiB per image) beside
  # 8 task vectors; if it does not fit, again with activation checkpointing.
  step 200 e2e_vit_h.log $PY benchmarks/e2e_calm.py --config vit-h --updates 2 --out "$OUT" \
    || step 200 e2e_vit_h.log $PY benchmarks/e2e_calm.py --config vit-h --updates 2 --grad-checkpointing --out "$OUT"
}

quality() {
  unpack || exit 1
  device_setup
  export CALM_FAST_CACHE="$QUALITY_CACHE" CALM_FAST_SHARED_DATA="$QUALITY_CACHE/data"
  step 540 quality.log $PY -m benchmarks.quality.run --size full --device cuda --out "$OUT"
}

case "$STAGE" in
  prepare|pack|unpack|core|e2e|quality) SECONDS=0; "$STAGE" || exit 1; echo "$STAGE: ${SECONDS}s" ;;
  *) echo "unknown stage $STAGE (prepare, pack, unpack, core, e2e, quality)"; exit 2 ;;
esac
