"""The op microbenchmark (`python -m benchmarks.ops`) runs end to end (small sizes; timings are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ops_quick_runs_and_writes_results(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.ops", "--quick", "--strict", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (result,) = tmp_path.glob("ops_*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["op"] for r in rows} >= {"mask_step_", "masked_apply_", "consensus_merge", "magnitude_threshold",
                                       "entropy_argmax", "pack_mask"}
    assert list(tmp_path.glob("ops_*.md"))
