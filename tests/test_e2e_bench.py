"""The end-to-end benchmark (benchmarks/e2e, `python -m benchmarks.e2e`) on a tiny open_clip ViT tower, on the CPU.

It must run all three variants ((a) the authors' data-movement scheme, (b) eager PyTorch with the
state on the device, (c) calm_fast.merge), write a report with every field, feed (b) and (c)
exactly the same batches, and (b)'s binary masks must agree with (c)'s. No timing asserts.
Needs open_clip_torch (and torchvision); skipped where it is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch

from calm_fast._source_tree import import_subpackage

pytestmark = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                reason="open_clip_torch is not installed")

TINY = ["--config", "cpu-small", "--vision-width", "64", "--vision-layers", "2", "--patch-size", "8",
        "--image-size", "32", "--tasks", "4", "--initial", "2", "--updates", "2", "--batch-size", "8",
        "--pool-size", "16", "--classes", "4", "--sparsity", "1e-3", "--threads", "1", "--quiet"]


def _load_runner():
    return importlib.import_module(f"{import_subpackage('benchmarks').__name__}.e2e.run")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    threads = torch.get_num_threads()
    try:
        payload = _load_runner().main(TINY + ["--out", str(out), "--name", "e2e_test"])
    finally:
        torch.set_num_threads(threads)
    return payload, out


def test_report_has_every_field(run):
    payload, out = run
    saved = json.loads((out / "e2e_test.json").read_text())
    md = (out / "e2e_test.md").read_text()
    meta = saved["metadata"]
    for key in ("device", "device_type", "driver", "torch", "triton", "open_clip_torch", "command",
                "calm_fast_backend", "date", "cores"):
        assert key in meta, key
    assert meta["command"].startswith("python -m benchmarks.e2e --config cpu-small")
    work = saved["workload"]
    assert work["num_params"] > 0 and work["param_bytes"] == 4 * work["num_params"]
    assert work["sequential"] == ["task2", "task3"] and work["updates"] == 2
    assert set(saved["variants"]) == {"authors", "eager", "calm_fast"}
    for name, row in saved["variants"].items():
        s = row["summary"]
        for key in ("fwd_bwd_s", "elementwise_s", "total_s"):
            assert s["per_update_s"][key] >= 0, (name, key)
        assert s["per_update_s"]["fwd_bwd_s"] > 0, name
        for key in ("elementwise_fraction", "mask_phase_s", "whole_run_s", "projected_full_schedule_s"):
            assert s[key] is not None and s[key] >= 0, (name, key)
        assert row["memory"]["rss_peak_bytes"] >= row["memory"]["rss_start_bytes"] > 0, name
        assert "phases" in row
    for name in ("(a) authors / (c) calm_fast", "(b) eager / (c) calm_fast"):
        r = saved["ratios"][name]
        for key in ("per_update", "elementwise", "mask_phase", "whole_run", "projected_full_schedule"):
            assert r[key] is not None and r[key] > 0, (name, key)
    names = [t["name"] for t in saved["targets"]]
    assert len(names) == 4 and any("5 %" in n for n in names) and any("5x" in n for n in names)
    assert any("2 P" in n for n in names) and any("larger backbone" in n for n in names)
    assert saved["internals"]["mask_step_sweep_ms"] > 0
    assert "| (c) calm_fast |" in md and "| (a) authors |" in md and "Targets" in md


def test_same_batches_pseudo_labels_and_masks(run):
    payload, _ = run
    checks = payload["checks"]
    assert checks["batch_sequence_identical"] is True
    assert checks["pseudo_labels_match"] is True
    assert checks["no_grad_keys_b_vs_c"] is True
    assert checks["masks_b_vs_c_keys_missing"] == 0
    assert checks["masks_b_vs_c_differ"] == 0, checks["masks_b_vs_c"]
    masks_b, masks_c = payload["_masks"]["eager"], payload["_masks"]["calm_fast"]
    assert set(masks_b) == set(masks_c) == {"task2", "task3"}
    on = 0
    for task, per_key in masks_c.items():
        assert set(per_key) == set(masks_b[task])
        for key, m in per_key.items():
            assert m.dtype == torch.bool and torch.equal(m, masks_b[task][key]), (task, key)
            on += int(m.sum())
    assert on > 0  # the masks are not trivially empty


def test_authors_scheme_runs_the_same_algorithm(run):
    """(a) differs from (c) only by rounding and its k − 1 initial entries: few mask entries differ."""
    payload, _ = run
    masks_a, masks_c = payload["_masks"]["authors"], payload["_masks"]["calm_fast"]
    total = sum(m.numel() for per_key in masks_c.values() for m in per_key.values())
    assert payload["checks"]["masks_a_vs_c_keys_missing"] == 0
    assert payload["checks"]["masks_a_vs_c_differ"] <= 0.05 * total
    assert set(masks_a) == set(masks_c)


def test_bf16_delta_and_autocast_run(tmp_path):
    """The vit-h configuration's path (bf16 δ, bf16 autocast, calm_fast only), on the tiny tower."""
    threads = torch.get_num_threads()
    try:
        payload = _load_runner().main(TINY + ["--variants", "c", "--delta-dtype", "bf16", "--autocast",
                                              "--out", str(tmp_path), "--name", "e2e_bf16"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "e2e_bf16.json").read_text())
    assert saved["workload"]["delta_dtype"] == "bf16" and saved["workload"]["autocast"] is True
    assert set(saved["variants"]) == {"calm_fast"}
    assert saved["variants"]["calm_fast"]["summary"]["per_update_s"]["fwd_bwd_s"] > 0
    assert sum(int(m.sum()) for per_key in payload["_masks"]["calm_fast"].values() for m in per_key.values()) > 0
