"""One point of the scaling sweep, measured in a fresh process (`python -m benchmarks.scaling
--child SPEC`): a data-free merge, or CALM with its probe, read lazily from the checkpoints."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from ..harness import MemoryWindow, fix_malloc_mmap_threshold, run_fresh
from .workload import BATCH, CLASSES, IMAGE_SIZE, SEED, tower_args


def memory_of(window: MemoryWindow) -> dict:
    """Peaks of a window: VmHWM (else sampled VmRSS) and RssAnon above the baseline; the device's."""
    base = window.baseline["VmRSS"]
    out = {"baseline_rss_bytes": base, "peak_rss_bytes": window.peak_rss,
           "rss_peak_above_baseline_bytes": window.peak_rss - base,
           "rss_peak_source": "VmHWM after clear_refs" if window.hwm_reset else "sampled",
           "anon_peak_above_baseline_bytes": window.peak_anon_above_baseline}
    if window.device.type == "cuda":
        out["device_start_bytes"] = window.device_start
        out["device_peak_bytes"] = window.device_peak
        out["device_peak_above_start_bytes"] = window.device_peak - window.device_start
    return out


@contextlib.contextmanager
def phase_log(events: list):
    """Record every phase calm_fast's CALM timer measures, in order: (name, seconds). The timer
    (calm_fast.calm.PhaseTimer, which synchronizes CUDA at the end of a phase) is wrapped, not changed."""
    from calm_fast.calm import PhaseTimer

    original = PhaseTimer.phase

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        with original(self, name):
            yield
        events.append((name, time.perf_counter() - start))

    PhaseTimer.phase = phase
    try:
        yield
    finally:
        PhaseTimer.phase = original


def per_step(events: list, first_seen: int) -> list[dict]:
    """The phase events grouped by sequential step (a step starts at its mask_init)."""
    steps = []
    for name, seconds in events:
        if name == "mask_init":
            steps.append({"seen": first_seen + len(steps), "mask_init_s": seconds, "fwd_bwd_s": [],
                          "elementwise_s": [], "finalize_s": 0.0})
        elif steps and name == "forward_backward":
            steps[-1]["fwd_bwd_s"].append(seconds)
        elif steps and name == "mask_step":
            steps[-1]["elementwise_s"].append(seconds)
        elif steps and name == "mask_finalize":
            steps[-1]["finalize_s"] += seconds
    for s in steps:  # the step's fastest update: on a shared machine, the least disturbed one
        s["update_fwd_bwd_s"], s["update_elementwise_s"] = min(s["fwd_bwd_s"]), min(s["elementwise_s"])
        s["update_s"] = s["update_fwd_bwd_s"] + s["update_elementwise_s"]
    return steps


def data_free_point(spec: dict, device, pretrained: str, finetuned: dict) -> dict:
    """A data-free merge of the checkpoint paths; TIES' threshold time apart."""
    import torch

    import calm_fast
    from calm_fast import baselines

    tiny = {"w": torch.randn(64, 64), "b": torch.randn(64)}  # warm-up: extension, OpenMP pool
    calm_fast.merge(tiny, {f"t{i}": {k: v + 0.01 for k, v in tiny.items()} for i in range(3)},
                    method=spec["method"], device=device, progress=False)
    del tiny
    spent = {"thresholds": 0.0}
    original = baselines.ties_thresholds

    def timed_thresholds(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent["thresholds"] += time.perf_counter() - t0

    baselines.ties_thresholds = timed_thresholds
    with MemoryWindow(device, sample="always", interval=0.005) as window:
        t0 = time.perf_counter()
        result = calm_fast.merge(pretrained, finetuned, method=spec["method"], device=device, progress=False)
        wall = time.perf_counter() - t0
    return {"memory": memory_of(window),
            "phases": {"merge_wall_s": wall, "thresholds_s": spent["thresholds"], "merge_s": wall - spent["thresholds"]},
            "merged_keys": len(result.state_dict)}


def calm_inputs(spec: dict, device, pretrained: str, tasks: list[str]):
    """The tower at θ0 on the device, its synthetic pools and heads (centered on θ0's features)."""
    import torch
    from safetensors.torch import load_file

    from ..e2e import problem as e2e

    model = e2e.build_backbone(tower_args(spec["tower"]))
    model.load_state_dict(load_file(pretrained))
    model.to(device)
    pools = e2e.synthetic_pools(tasks, spec["pool"], CLASSES, IMAGE_SIZE, SEED)
    gen = torch.Generator().manual_seed(SEED + 99)
    heads = {t: e2e.SyntheticHead(model.output_dim, CLASSES, gen).to(device).requires_grad_(False) for t in tasks}
    with torch.no_grad():  # center each head on the pretrained features of its images
        for t in tasks:
            heads[t].mu.copy_(model(pools[t]["x"][:64].to(device)).float().mean(0))
    return model, pools, heads


def calm_probe(model, pools, heads, task: str, device) -> dict:
    """Model gradients + activations of one forward/backward of one batch."""
    import torch
    import torch.nn.functional as F

    with MemoryWindow(device, sample="never") as window:
        for p in model.parameters():
            p.requires_grad_(True)
        for _ in range(2):
            x = pools[task]["x"][:BATCH].to(device)
            y = torch.arange(BATCH, device=device) % CLASSES
            F.cross_entropy(heads[task](model(x)), y).backward()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return memory_of(window)


def calm_point(spec: dict, device, pretrained: str, finetuned: dict) -> dict:
    """CALM over the checkpoint paths: the probe, then the merge with its phases per step."""
    import calm_fast
    from calm_fast.calm.config import AUTHORS_SCALING

    tasks = list(finetuned)
    model, pools, heads = calm_inputs(spec, device, pretrained, tasks)
    config = calm_fast.CALMConfig(initial=tuple(tasks[:1]), sequential=tuple(tasks[1:]), updates=spec["updates"],
                                  batches_per_task=1, batch_size=BATCH, sparsity=1e-3, score_batch_size=64,
                                  init_scaling=AUTHORS_SCALING)  # a fixed λ: this times the mask loop
    out = {"probe": calm_probe(model, pools, heads, tasks[0], device)}
    events = []
    with MemoryWindow(device, sample="always", interval=0.005) as window:
        t0 = time.perf_counter()
        with phase_log(events):
            result = calm_fast.merge(pretrained, finetuned, method="calm", model=model, heads=heads, data=pools,
                                     forward=lambda b: model(b["x"]), config=config, device=device, progress=False)
        wall = time.perf_counter() - t0
    out["memory"] = memory_of(window)
    steps = per_step(events, first_seen=2)
    out["phases"] = {"merge_wall_s": wall, **{f"{k}_s": v for k, v in result.report.seconds.items()}}
    out["per_update"] = {k: sum(s[f"update_{k}"] for s in steps) / len(steps) for k in ("fwd_bwd_s", "elementwise_s")}
    out["per_update"]["total_s"] = out["per_update"]["fwd_bwd_s"] + out["per_update"]["elementwise_s"]
    out["steps"] = steps
    out["pseudo_labels_kept"] = {t: sum(c.values()) for t, c in result.report.pseudo_labels.items()}
    out["mask_bytes"] = sum(b.numel() for step in result.masks.bits.values() for b in step.values())
    return out


def child(spec: dict) -> dict:
    """Measure one (method, tower, T, pool) point; the result as a dict."""
    import torch

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cpu":
        fix_malloc_mmap_threshold(1 << 20)
    folder, tasks = Path(spec["folder"]), [f"task{i}" for i in range(spec["tasks"])]
    pretrained = str(folder / "pretrained.safetensors")
    finetuned = {t: str(folder / f"{t}.safetensors") for t in tasks}
    out = {"loadavg_start": list(os.getloadavg())}
    point = calm_point if spec["method"] == "calm" else data_free_point
    out.update(point(spec, device, pretrained, finetuned))
    out["loadavg_end"] = list(os.getloadavg())
    out["torch_threads"] = torch.get_num_threads()
    return out


def run_child(spec: dict) -> dict:
    """child(spec) in a fresh process (`python -m benchmarks.scaling --child SPEC`)."""
    env = {"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {}
    return run_fresh(__package__, ["--child", json.dumps(spec)], f"scaling: point {spec}", env)
