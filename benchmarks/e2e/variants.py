"""The three variants of the end-to-end benchmark, run on the same problem and batches:
(a) the authors' data-movement scheme (authors_scheme.py), (b) eager PyTorch with all state on
the device (eager_gpu.py), (c) calm_fast.merge (here); each under a memory window, summarized."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
import warnings

import torch

import calm_fast
from calm_fast import ops as cf_ops

from ..harness import GiB, sync
from . import authors_scheme, eager_gpu
from .measure import Memory
from .problem import Problem, Sampler

VARIANTS = {"a": "authors", "b": "eager", "c": "calm_fast"}
FULL_UPDATES = 100  # the authors' schedule, for projections of shortened runs


def _merge_recording(problem: Problem, seed: int, count_syncs: bool):
    """calm_fast.merge on the problem: its result and wall time, and per forward call with gradients
    (the mask optimization) the batch rows, the time and the synchronizations counted so far."""
    recorded, stamps = [], []
    caught: list = []
    model = problem.make_model()

    def forward(batch):
        if torch.is_grad_enabled():  # mask optimization (scoring runs under no_grad)
            recorded.append(batch["i"])
            stamps.append((time.perf_counter(), len(caught)))
        return model(batch["x"])

    sync_ctx = contextlib.nullcontext()
    if count_syncs and problem.device.type == "cuda":
        sync_ctx = warnings.catch_warnings(record=True)
    start = time.perf_counter()
    with sync_ctx as w:
        if w is not None:
            warnings.simplefilter("always")
            caught = w
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = calm_fast.merge(problem.theta0, problem.finetuned, method="calm", model=model,
                                     heads=problem.heads, data=problem.pools, forward=forward,
                                     config=problem.config, device=problem.device, seed=seed,
                                     progress=False)
        finally:
            if w is not None:
                torch.cuda.set_sync_debug_mode(0)
    sync(problem.device)
    return result, time.perf_counter() - start, recorded, stamps, caught


def _updates_from_stamps(problem: Problem, stamps: list, count_syncs: bool) -> list[dict]:
    """Per-update wall times from the first forward call of each update (calm_fast's phase timer
    synchronizes at the end of each update, so consecutive starts bound one whole update)."""
    cfg = problem.config
    updates, i, seen = [], 0, len(problem.initial)
    for step, task in enumerate(problem.sequential):
        seen += 1
        per = seen * cfg.batches_per_task
        starts = [stamps[i + u * per] for u in range(cfg.updates)]
        for u in range(cfg.updates - 1):
            updates.append({"step": step, "task": task, "update": u, "seen": seen, "batches": per,
                            "total_s": starts[u + 1][0] - starts[u][0],
                            "syncs": starts[u + 1][1] - starts[u][1] if count_syncs else None})
        i += cfg.updates * per
    return updates


def run_calm_fast(problem: Problem, seed: int, count_syncs: bool) -> dict:
    """(c): calm_fast.merge on the same weights, heads and data; records the batches it draws."""
    result, wall, recorded, stamps, caught = _merge_recording(problem, seed, count_syncs)
    rep, cfg = result.report, problem.config
    sec = dict(rep.seconds)
    n_updates = cfg.updates * len(problem.sequential)
    masks = {task: {k: cf_ops.unpack_mask(bits, problem.theta0[k].numel()).reshape(problem.theta0[k].shape).cpu()
                    for k, bits in step_masks.items()}
             for task, step_masks in result.masks.bits.items()}
    phases = {"merge_wall_s": wall, **{f"{k}_s": v for k, v in sec.items()}}
    per_update = {"fwd_bwd_s": sec.get("forward_backward", 0.0) / max(n_updates, 1),
                  "elementwise_s": sec.get("mask_step", 0.0) / max(n_updates, 1)}
    per_update["total_s"] = per_update["fwd_bwd_s"] + per_update["elementwise_s"]
    out = {"phases": phases, "updates": _updates_from_stamps(problem, stamps, count_syncs),
           "per_update_from_report": per_update, "masks": masks,
           "no_grad_keys": rep.no_grad_keys, "recorded_batches": [r.cpu() for r in recorded],
           "mask_density": rep.mask_density, "pseudo_labels": rep.pseudo_labels,
           "backend": cf_ops.resolve_backend(problem.device)}
    if count_syncs and problem.device.type == "cuda":
        out["syncs_total"] = len(caught)
    del result
    return out


def summarize(name: str, res: dict, problem: Problem, pseudo_label_s: float) -> dict:
    """Per-update means, phase sums, whole-run and projected full-schedule times of one variant."""
    cfg = problem.config
    n_updates = cfg.updates * len(problem.sequential)
    ph = res["phases"]
    if name == "calm_fast":
        pu = dict(res["per_update_from_report"])
        mask_phase = sum(ph.get(k, 0.0) for k in ("mask_init_s", "forward_backward_s", "mask_step_s", "mask_finalize_s"))
        whole = ph["merge_wall_s"]
        update_total = ph.get("forward_backward_s", 0.0) + ph.get("mask_step_s", 0.0)
    else:
        ups = res["updates"]
        pu = {k: sum(u[k] for u in ups) / max(len(ups), 1) for k in ("fwd_bwd_s", "elementwise_s", "total_s")}
        mask_phase = ph["mask_init_s"] + ph["updates_s"] + ph["mask_finalize_s"]
        whole = pseudo_label_s + sum(v for k, v in ph.items())
        update_total = ph["updates_s"]
    # projection to FULL_UPDATES per step: per-step mean update time x the missing updates
    missing = 0.0
    for step, _ in enumerate(problem.sequential):
        times = [u["total_s"] for u in res["updates"] if u["step"] == step]
        mean = statistics.fmean(times) if times else pu["total_s"]
        missing += mean * max(FULL_UPDATES - cfg.updates, 0)
    extra = {}
    if name == "calm_fast":  # merge() time outside calm_fast's phase timer: validation, pools, output copy
        extra["outside_phases_s"] = whole - sum(v for k, v in ph.items() if k != "merge_wall_s")
    return {**extra, "per_update_s": pu, "elementwise_fraction": pu["elementwise_s"] / pu["total_s"] if pu["total_s"] else None,
            "updates": n_updates, "updates_s": update_total, "mask_phase_s": mask_phase,
            "whole_run_s": whole, "projected_full_schedule_s": whole + missing,
            "per_update_by_step_s": {str(s): statistics.fmean([u["total_s"] for u in res["updates"] if u["step"] == s])
                                     for s in range(len(problem.sequential))
                                     if any(u["step"] == s for u in res["updates"])}}


def compare_masks(ref: dict, other: dict) -> dict:
    """Binary masks of two variants: entries that differ, per step task."""
    out = {}
    for task, masks in ref.items():
        diff, total, keys_missing = 0, 0, []
        for key, m in masks.items():
            o = other.get(task, {}).get(key)
            if o is None:
                keys_missing.append(key)
                continue
            diff += int((m != o).sum())
            total += m.numel()
        out[task] = {"differ": diff, "total": total, "on_ref": int(sum(int(m.sum()) for m in masks.values())),
                     "keys_missing": keys_missing[:5]}
    return out




def run_variants(args, problem: Problem, probe: dict, pseudo_label_s: float, log) -> dict:
    """name -> row (label, summary, memory, result; on CUDA the extra device memory over the
    probe) of each variant args.variants names, in that order."""
    device, param_bytes = problem.device, problem.num_params * 4
    variants = {}
    for v in args.variants:
        name = VARIANTS[v]
        log(f"--- ({v}) {name}")
        with Memory(device) as mem:
            if v == "a":
                res = authors_scheme.run(problem, Sampler(problem, args.seed))
            elif v == "b":
                res = eager_gpu.run(problem, Sampler(problem, args.seed))
            else:
                res = run_calm_fast(problem, args.seed, count_syncs=not args.no_sync_count)
        gc.collect()
        summary = summarize(name, res, problem, pseudo_label_s)
        row = {"label": f"({v}) {name}", "summary": summary, "memory": mem.result, "result": res}
        if device.type == "cuda":
            row["extra_device_bytes"] = mem.result["device_peak_bytes"] - probe["device_peak_bytes"]
            row["extra_device_x_param"] = row["extra_device_bytes"] / param_bytes
        variants[name] = row
        pu = summary["per_update_s"]
        log(f"({v}) {name}: update {pu['total_s'] * 1e3:.1f} ms (fwd/bwd {pu['fwd_bwd_s'] * 1e3:.1f}, "
            f"element-wise {pu['elementwise_s'] * 1e3:.1f}); whole run {summary['whole_run_s']:.2f} s; "
            f"peak RSS {mem.result['rss_peak_bytes'] / GiB:.2f} GiB"
            + (f"; peak device {mem.result['device_peak_bytes'] / GiB:.2f} GiB "
               f"({row['extra_device_x_param']:+.2f} P over the probe)" if device.type == "cuda" else ""))
    return variants
