#!/usr/bin/env bash
# The lent-GPU run, planned around the device tool's limits: 15 minutes of device time in all
# (the machine's start, every call, every idle wait), at most 10 minutes a call, 64 MiB carried.
#
#   here, before:  bash benchmarks/gpu_run.sh prepare        (registries: wheels, prebuilt extension,
#                                                             quality data packs)
#   device call 1: bash benchmarks/gpu_run.sh run             timeout_s 570
#                  carry: .whl .device-carry/prebuilt .device-carry/quality-1
#                  setup (prebuilt extension; capped rebuild only if it does not load), preflight,
#                  GPU tests (every op x backend x dtype, large tensors, graphs, streams, merge on
#                  CUDA), op benchmarks at 256 M elements, ViT-L-14 (a)/(b)/(c) shortened
#   device call 2 (optional, only if >= 5 minutes remain, right after call 1 on the warm machine):
#                  bash benchmarks/gpu_run.sh quality         carry: .device-carry/quality-2
#
# The run fails loudly: no GPU, no CUDA build, or a backend that falls back is an error, and the
# tests run with CALM_FAST_REQUIRE_GPU=1 (a skipped CUDA test fails). Each phase has a time cap
# and the whole call a budget (RUN_BUDGET_S), so a slow phase shortens the later ones instead of
# losing the call. Everything lands in $OUT as it goes: summary.md (per phase) and results.tar (each
# phase's log, JSON, markdown; refreshed every 20 s), 2 files of the 8 a call returns; the phases'
# output is also printed, so the reply's tail shows it.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:?usage: gpu_run.sh prepare|run|quality|setup|preflight|stage-prebuilt|pack|unpack}"
shift
OUT="${OUT:-/tmp/calm-fast-gpu-out}"
WORK="${CALM_FAST_GPU_WORK:-/tmp/calm-fast-gpu-run}"   # results before they are tarred into $OUT
CARRY="${CALM_FAST_DEVICE_CARRY:-.device-carry}"
QUALITY_CACHE="${CALM_FAST_DEVICE_CACHE:-/tmp/calm-fast-quality}"
PY="${PY:-python3}"
RUN_BUDGET_S="${RUN_BUDGET_S:-540}"
QUALITY_FIRST_PART="${QUALITY_FIRST_PART:-$((45 << 20))}"  # bytes of the quality pack in the run call
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
# calm_fast is not installed there: the benchmarks (python -m benchmarks.<name>) import it from this
# tree's root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Wheels the GPU image lacks, at the benchmark pins (the image has timm, huggingface_hub, regex).
WHEELS=(open_clip_torch ftfy wcwidth expecttest)

# --- here ---------------------------------------------------------------------------------------

build_inputs_hash() {  # what the extension is built from: a prebuilt one from other inputs is stale
  find csrc kernels/cuda setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \
      -o -name SOURCES -o -name ISAS -o -name '*.py' \) -not -path '*/__pycache__/*' \
    | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1
}

abi_tag() {  # python ABI and torch build of $PY: a prebuilt extension loads only into the same
  $PY -c "import sys, torch; print(f'cp{sys.version_info[0]}{sys.version_info[1]} torch {torch.__version__}')"
}

stage_prebuilt() {  # the extension built in place in this tree -> $CARRY/prebuilt, with its manifest
  local dest="$CARRY/prebuilt"
  compgen -G "calm_fast/_C*.so" >/dev/null || { echo "stage-prebuilt: no calm_fast/_C*.so built here"; return 1; }
  rm -rf "$dest" && mkdir -p "$dest" && cp calm_fast/_C*.so "$dest/" || return 1
  { echo "abi $(abi_tag)"; echo "inputs $(build_inputs_hash)"; } > "$dest/MANIFEST"
  cat "$dest/MANIFEST"; du -sh "$dest"
}

prepare() {  # wheels, the extension for the GPU image (cp312, torch 2.11.0+cu130, sm_90), data packs
  local py=${PYTHON:-.venv/bin/python} venv=.venv-gpu312 tree
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    $(grep -hE "^($(IFS='|'; echo "${WHEELS[*]}"))==" requirements/bench-cpu.txt requirements/cpu.txt) || return 1
  if [ ! -x "$venv/bin/python" ]; then
    "$(pyenv root)/versions/$(pyenv versions --bare | grep -m1 '^3\.12')/bin/python" -m venv "$venv" || return 1
    "$venv/bin/pip" install -q -r requirements/cuda-min.txt || return 1
  fi
  # a clean copy of the tree, built in place with the GPU image's Python and torch
  tree=$(mktemp -d) && git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$tree" || return 1
  (cd "$tree" && CALM_FAST_REQUIRE_CUDA_BUILD=1 "$OLDPWD/$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1) \
    || { tail -30 "$tree/build.log"; return 1; }
  (cd "$tree" && PY="$OLDPWD/$venv/bin/python" CALM_FAST_DEVICE_CARRY="$OLDPWD/$CARRY" bash benchmarks/gpu_run.sh stage-prebuilt) || return 1
  rm -rf "$tree"
  $py scripts/fetch_quality_data.py && pack
  du -sh .whl "$CARRY"/*
}

pack() {  # the quality cache (data, model code, shared subsets) as one xz stream in two carried parts
  local py=${PYTHON:-.venv/bin/python} cache shared stream="$CARRY/quality.tar.xz"
  cache=$($py -c "from benchmarks.quality.data import cache_dir; print(cache_dir())") || return 1
  shared=$($py -c "from benchmarks.quality.data import shared_data_dir; print(shared_data_dir())") || return 1
  rm -rf "$CARRY"/quality-* && mkdir -p "$CARRY/quality-1" "$CARRY/quality-2"
  # the shared subsets go under data/ beside the cache's own files
  tar -cf - -C "$cache" data/mnist.npz data/fashion_mnist.npz site \
      -C "$shared" --transform 's,^\(cifar10\|gtsrb\)_subset,data/&,' cifar10_subset.npz gtsrb_subset.npz \
    | xz -T0 -6 > "$stream" || return 1
  sha256sum "$stream" | cut -d' ' -f1 > "$CARRY/quality-1/sha256"
  # the run call also carries the tree, wheels and prebuilt extension (~12 MiB): its part is smaller
  head -c "$QUALITY_FIRST_PART" "$stream" > "$CARRY/quality-1/part.00" || return 1
  tail -c +$((QUALITY_FIRST_PART + 1)) "$stream" > "$CARRY/quality-2/part.01" && rm "$stream"
  du -sh "$CARRY"/quality-*
}

# --- there --------------------------------------------------------------------------------------

unpack() {  # both parts -> $QUALITY_CACHE (cache layout: data/, site/)
  local parts=("$CARRY"/quality-1/part.* "$CARRY"/quality-2/part.*)
  if [ ! -f "$CARRY/quality-1/sha256" ] || [ ! -f "${parts[0]}" ] || [ ! -f "${parts[1]}" ]; then
    echo "quality: both data packs must be on the machine ($CARRY/quality-1 from the run call," \
         "$CARRY/quality-2 from the quality call, back to back while it stays warm)"; return 1
  fi
  if [ "$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)" != "$(cat "$CARRY/quality-1/sha256")" ]; then
    echo "quality: the data packs do not fit together (run pack again and carry both)"; return 1
  fi
  mkdir -p "$QUALITY_CACHE" && cat "${parts[@]}" | xz -d | tar -x -C "$QUALITY_CACHE"
}

extension_loads() {  # the in-place extension imports and, unless CPU-only is asked for, has CUDA kernels
  $PY -c "
import sys, calm_fast
ext = calm_fast._extension
sys.exit(0 if ext.NATIVE and (ext.NATIVE_CUDA or '$1' == 'cpu') else f'extension: native={ext.NATIVE} cuda={ext.NATIVE_CUDA} ({ext.LOAD_ERROR})')"
}

setup() {  # carried wheels; the prebuilt extension if it fits this Python/torch/tree, else a capped build
  local device=${1:-cuda} manifest="$CARRY/prebuilt/MANIFEST" t0=$SECONDS
  mkdir -p "$WORK"
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ -f "$manifest" ] && [ "$(sed -n 's/^abi //p' "$manifest")" = "$(abi_tag)" ] \
      && [ "$(sed -n 's/^inputs //p' "$manifest")" = "$(build_inputs_hash)" ]; then
    cp "$CARRY"/prebuilt/_C*.so calm_fast/ && extension_loads "$device" && { echo "setup: prebuilt extension loaded"; return 0; }
    echo "setup: the prebuilt extension does not load here; building"
  else
    echo "setup: no prebuilt extension for $(abi_tag) and this tree; building"
  fi
  rm -f calm_fast/_C*.so
  timeout --kill-after=10 "${BUILD_CAP_S:-240}" $PY setup.py build_ext --inplace > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; echo "setup: build failed or ran past ${BUILD_CAP_S:-240}s"; return 1; }
  extension_loads "$device" || return 1
  echo "setup: built in $((SECONDS - t0))s"
}

preflight() {  # fail loudly before spending minutes: GPU, CUDA build, Triton from the tree, no fallback
  $PY -m benchmarks.gpu_preflight "$@"
}

collect() {  # everything in $WORK -> $OUT/results.tar, atomically (a cut-short call keeps the last)
  tar -cf "$OUT/.results.tar" -C "$WORK" . 2>/dev/null && mv "$OUT/.results.tar" "$OUT/results.tar"
}

record() {  # record NAME EXIT_CODE START_S: one row of $OUT/summary.md, then the results tarred
  echo "| $1 | exit $2 | $((SECONDS - $3))s |" >> "$OUT/summary.md"
  collect
}

phase() {  # phase NAME CAP_S command...: capped by its cap and what is left of the budget
  local name=$1 cap=$2 left t0=$SECONDS rc; shift 2
  left=$((RUN_BUDGET_S - SECONDS))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    echo "| $name | skipped: ${left}s of the budget left | |" >> "$OUT/summary.md"; return 1
  fi
  echo "== $name (cap ${cap}s, at ${SECONDS}s): $*"
  timeout --kill-after=10 "$cap" "$@" > >(tee "$WORK/$name.log") 2>&1
  rc=$?
  record "$name" $rc "$t0"
  return $rc
}

run() {
  SECONDS=0
  mkdir -p "$OUT" "$WORK"
  { echo "# calm_fast GPU run"; echo; echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    echo "command: bash benchmarks/gpu_run.sh run"; echo '```'; echo
    echo "| phase | result | time |"; echo "|---|---|---|"; } > "$OUT/summary.md"
  (while sleep 20; do collect; done) &
  COLLECTOR=$!
  trap 'kill $COLLECTOR 2>/dev/null' EXIT
  local failed=0 t0=$SECONDS rc
  # in this shell (it exports the wheels' path); its build has its own cap
  setup cuda > >(tee "$WORK/setup.log") 2>&1
  rc=$?
  record setup $rc "$t0"
  [ $rc -eq 0 ] || { cat "$OUT/summary.md"; return 1; }
  phase preflight 60 $PY -m benchmarks.gpu_preflight --device cuda || { cat "$OUT/summary.md"; return 1; }
  export CALM_FAST_REQUIRE_GPU=1
  # every CUDA row of the suite: each op x backend x dtype, graphs, streams, views, merge on CUDA
  phase tests 140 $PY -m pytest -q -p no:cacheprovider -n 8 -k cuda -m "not large" --junitxml="$WORK/tests.xml" tests || failed=1
  # tensors over 2^31 elements, one at a time (each holds ~10 GiB)
  phase large 60 $PY -m pytest -q -p no:cacheprovider -m large --large -k cuda tests/test_large_tensors.py || failed=1
  # eager / native / Triton for every op at 256 M elements; torch.compile for two ops only
  phase ops 130 $PY -m benchmarks.ops --device cuda --variants eager native triton --strict \
    --out "$WORK/ops" || failed=1
  phase ops_compile 60 $PY -m benchmarks.ops --device cuda --variants eager compile \
    --ops mask_step_ masked_apply_ --out "$WORK/ops_compile" || failed=1
  # ViT-L-14 (a)/(b)/(c), 2 updates per sequential step (the full schedule is projected)
  phase e2e_vit_l 120 $PY -m benchmarks.e2e --config vit-l --updates 2 --tf32 --out "$WORK/e2e" || failed=1
  echo; cat "$OUT/summary.md"; echo "run: ${SECONDS}s"
  return $failed
}

quality() {  # the optional second call: the full-size quality benchmark, on the warm machine
  SECONDS=0
  mkdir -p "$OUT" "$WORK"
  echo "| phase | result | time |" > "$OUT/summary.md"; echo "|---|---|---|" >> "$OUT/summary.md"
  unpack || return 1
  setup cuda || return 1
  export CALM_FAST_CACHE="$QUALITY_CACHE" CALM_FAST_SHARED_DATA="$QUALITY_CACHE/data"
  phase quality 520 $PY -m benchmarks.quality.run --size full --device cuda --out "$WORK/quality"
}

case "$STAGE" in
  prepare|pack|unpack|run|quality|setup|preflight) "$STAGE" "$@" ;;
  stage-prebuilt) stage_prebuilt ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
