"""The distributed CALM benchmark (`python -m benchmarks.distributed_calm --quick`) runs end to end:
one process and two ranks under each allocator setting, the agreement check and the memory
model's GPU table are written (timings and peaks are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_calm_quick_runs_and_writes_results(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.distributed_calm", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    payload = json.loads((tmp_path / "distributed_calm_cpu_quick.json").read_text())
    markdown = (tmp_path / "distributed_calm_cpu_quick.md").read_text()

    allocators = set(payload["agreement"])
    assert len(allocators) == 2
    for allocator in allocators:
        runs = {row["run"] for row in payload["rows"] if row["allocator"] == allocator}
        assert runs == {"one process", "rank 0 of 2", "rank 1 of 2"}
    for row in payload["rows"]:
        assert row["seconds"] > 0 and row["phases"] and row["peak_above_baseline"] >= 0
        assert row["predicted"]["total"] > 0
    for agree in payload["agreement"].values():
        assert agree["pseudo_labels_equal"] and agree["sequential_equal"]
        assert agree["mask_bits"] == payload["sizes"]["params"]
        assert 0 <= agree["mask_bits_differing_fraction"] <= 1 and agree["max_abs_weight_diff"] >= 0
        assert 0 <= agree["weights_differing"] <= payload["sizes"]["params"]

    table = {(row["model"], row["ranks"]) for row in payload["gpu_rows"]}
    assert table == {(model, n) for model in ("ViT-bigG-14 image tower", "Llama 7B", "Llama 70B") for n in (1, 2, 4, 8)}
    for row in payload["gpu_rows"]:
        assert set(row["left_gib"]) == {"H100 80GB", "H200 141GB"}
    for text in ("rank 1 of 2", "mask bits differing", "Llama 70B", "H200 141GB"):
        assert text in markdown
