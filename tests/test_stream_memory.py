"""benchmarks/stream_memory.py (`python -m benchmarks.stream_memory`) runs end to end, and a lazy
merge does not hold all T+1 models.

The structural check is on total RSS (VmHWM, file-backed pages of the mapped checkpoints
included): about one model plus allocator slack is expected (1.2-1.4 x at full size, see
benchmarks/results/stream_memory_cpu.md); holding the T+1 models it reads would be T+1 x.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("task_arithmetic", "ties", "consensus")


def test_stream_memory_quick(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.stream_memory", "--quick",
                          "--loaders", "lazy", "--out", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    payload = json.loads((tmp_path / "results" / "stream_memory_cpu.json").read_text())
    assert (tmp_path / "results" / "stream_memory_cpu.md").exists()
    rows = {(r["method"], r["loader"]): r for r in payload["rows"]}
    for method in METHODS:
        for loader in ("lazy",):
            row = rows[(method, loader)]
            for field in ("peak_above_baseline_mb", "anon_above_baseline_mb", "peak_above_baseline_x_model",
                          "anon_above_baseline_x_model", "t_total_s"):
                assert isinstance(row[field], (int, float)) and math.isfinite(row[field]), (method, loader, field)
            assert row["peak_above_baseline_mb"] > 0, (method, loader)

    # merging checkpoint paths streams: far below the T+1 models it reads, for every method
    tasks = payload["workload"]["tasks"]
    for method in METHODS:
        lazy = rows[(method, "lazy")]
        assert lazy["peak_above_baseline_x_model"] < (tasks + 1) / 2, lazy
