#!/usr/bin/env bash
# From a fresh clone: install the pinned CPU environment, build calm_fast, run the main job
# (examples/toy_merge.py: four conflicting tasks merged with every method). Extra arguments
# go to the example, e.g. `bash scripts/demo.sh --updates 50`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements/cpu.txt
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python examples/toy_merge.py "$@"
