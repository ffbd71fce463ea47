#!/usr/bin/env bash
# From a fresh clone: install pinned dependencies, build calm_fast, run every test.
#  1. .venv (CPU torch): editable build of the C++ kernels, CMake build of the same sources,
#     then the whole test suite (C++ kernels, Triton kernels under TRITON_INTERPRET=1).
#  2. .venv-cuda (CUDA torch, when nvcc is present): builds and links the CUDA kernels for
#     sm_90 and checks each op has a CUDA kernel registered. GPU runtime tests run only on a GPU.
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
logged build/cpu-build.log pip_install .venv --no-build-isolation --no-deps -e .

step "CMake build of the native modules (CPU)"
logged build/cmake-configure.log cmake -S . -B build/cmake -DPython_EXECUTABLE="$PWD/.venv/bin/python" \
  -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
logged build/cmake-build.log cmake --build build/cmake -j 2

if [ -x "$CUDA_HOME/bin/nvcc" ]; then
  step "CUDA build (nvcc sm_${TORCH_CUDA_ARCH_LIST/./}) against torch+cu130, link and registration check"
  [ -x .venv-cuda/bin/python ] || python3 -m venv .venv-cuda
  pip_install .venv-cuda -r requirements/cuda.txt
  logged build/cuda-build.log pip_install .venv-cuda --no-build-isolation --no-deps .
  # run from tests/ so that the installed package, not the source tree, is imported
  (cd tests && CALM_FAST_REQUIRE_CUDA_BUILD=1 ../.venv-cuda/bin/pytest -q -p no:cacheprovider \
     test_torch_integration.py)
else
  echo "nvcc not found under $CUDA_HOME: CUDA build skipped"
fi

step "test suite"
.venv/bin/pytest -q tests "$@"
step "done"
