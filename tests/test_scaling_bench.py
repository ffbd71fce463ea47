"""benchmarks/scaling (`python -m benchmarks.scaling`): the sweep at its smallest size runs and
writes every field; the fits and claims logic on made-up numbers. No timing asserts. The sweep
needs open_clip_torch."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from calm_fast._source_tree import import_subpackage

ROOT = Path(__file__).resolve().parents[1]


def _scaling():
    """The sweep's fits and claims (benchmarks/scaling/fits.py)."""
    return importlib.import_module(f"{import_subpackage('benchmarks').__name__}.scaling.fits")


def test_fit_power_recovers_exponents():
    s = _scaling()
    rows = [{"T": T, "N": N, "y": 3.0 * T**1.5 * N**0.5} for T in (2, 4, 8) for N in (10, 100)]
    f = s.fit_power(rows, ["T", "N"], "y")
    assert f["exponents"]["T"] == pytest.approx(1.5) and f["exponents"]["N"] == pytest.approx(0.5)
    assert f["coefficient"] == pytest.approx(3.0) and f["r2"] == pytest.approx(1.0)
    assert s.fit_power(rows[:1], ["T"], "y") is None  # too few points
    assert s.fit_power([{"T": 2, "N": n, "y": n} for n in (1, 2, 3)], ["T", "N"], "y") is None  # T never varies
    line = s.fit_line([{"T": T, "m": 1 + 0.25 * T} for T in (2, 4, 8)], "T", "m")
    assert line["slope"] == pytest.approx(0.25) and line["intercept"] == pytest.approx(1.0)
    assert "T^1.50" in s.fmt_fit(f)


def test_claims_on_made_up_rows():
    """Flat CALM extra memory, data-free peak at 1 + T·params, update time ∝ seen: all confirmed;
    data-free memory of T models: refuted."""
    s = _scaling()
    rows = []
    for T in (2, 4, 8, 16):
        steps = [{"seen": k, "update_s": 0.1 * k, "update_fwd_bwd_s": 0.09 * k, "update_elementwise_s": 0.01 * k,
                  "finalize_s": 0.01} for k in range(2, T + 1)]
        rows.append({"method": "calm", "sweeps": ["tasks"], "T": T, "N": 1e6, "wall_s": T, "extra_x_P": 2.05 + (T - 1) / 32,
                     "extra_less_masks_x_P": 2.05, "masks_x_P": (T - 1) / 32,
                     "reference_x_P": 2.0 + (T - 1) / 32, "peak_rss_above_baseline_x_P": 3.1, "steps": steps,
                     "pseudo_labels_s": 0.1 * T})
        for m in s.DATA_FREE:
            rows.append({"method": m, "sweeps": ["tasks"], "T": T, "N": 1e6, "wall_s": 0.1 * T,
                         "peak_rss_above_baseline_x_P": 1.1 + T / 12, "reference_x_P": 1 + T / 12})
    claims = s.claims_for(rows, s.fits_for(rows))
    assert len(claims) == 3 and all(c["confirmed"] for c in claims), claims
    for r in rows:
        if r["method"] == "ties":
            r["peak_rss_above_baseline_x_P"] = r["T"]
    assert [c["confirmed"] for c in s.claims_for(rows, s.fits_for(rows))] == [True, False, True]


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip_torch is not installed")
def test_quick_sweep_writes_every_field(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--quick", "--device", "cpu",
                          "--out", str(tmp_path), "--name", "scaling_test"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    payload = json.loads((tmp_path / "scaling_test.json").read_text())
    md = (tmp_path / "scaling_test.md").read_text()
    meta = payload["metadata"]
    for key in ("device", "device_type", "cores", "torch", "open_clip_torch", "loadavg_start", "loadavg_end", "date"):
        assert key in meta, key
    assert payload["command"].startswith("python -m benchmarks.scaling --quick")
    assert set(payload["grid"]) == {"tasks", "size", "pool"}
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"calm", "task_arithmetic", "ties", "consensus"}
    for method, r in rows.items():
        assert r["param_bytes"] == 4 * r["N"] > 0 and r["T"] == 2, method
        assert r["wall_s"] > 0 and r["phases"]["merge_wall_s"] > 0, method
        mem = r["memory"]
        assert mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"] > 0, method
        for key in ("peak_rss_above_baseline_x_P", "reference_x_P"):
            assert math.isfinite(r[key]), (method, key)
    calm = rows["calm"]
    for key in ("pseudo_labels_s", "initial_merge_s", "mask_init_s", "forward_backward_s", "mask_step_s",
                "mask_finalize_s"):
        assert calm["phases"][key] >= 0, key
    assert calm["per_update"]["fwd_bwd_s"] > 0 and calm["per_update"]["elementwise_s"] > 0
    assert [s["seen"] for s in calm["steps"]] == [2] and len(calm["steps"][0]["fwd_bwd_s"]) == payload["updates"]
    assert math.isfinite(calm["extra_x_P"]) and math.isfinite(calm["probe_x_P"])
    assert rows["ties"]["phases"]["thresholds_s"] > 0
    assert "## CALM" in md and "## Data-free merges" in md and "## Claims" in md and "| TIES |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "scaling_test.png").stat().st_size > 0 and payload["plot"] == "scaling_test.png"
