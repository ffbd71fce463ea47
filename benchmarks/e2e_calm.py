#!/usr/bin/env python
"""End-to-end CALM benchmark: the authors' data-movement scheme vs eager PyTorch on the device
vs calm_fast.merge, on an open_clip ViT visual tower with synthetic task vectors.

    python benchmarks/e2e_calm.py --config cpu-small|vit-l|vit-h [--updates 5] [--variants a,b,c]
                                  [--batch-size 64] [--tf32] [--autocast] [--delta-dtype bf16] ...

Configurations (every field can be overridden by its flag):
  cpu-small  ViT-B-32 visual tower at 64 px, batch 8, 3 updates per step, CPU: runs anywhere (CI
             runs a still smaller open_clip tower through tests/test_e2e_bench.py).
  vit-l      ViT-L-14 visual tower (304 M parameters) at 224 px, the authors' schedule: 8 tasks,
             6 merged by task arithmetic, 2 sequential steps x 100 updates x 2 batches of 128 per
             seen task. On one GPU. --updates N shortens it; the full schedule is projected.
  vit-h      ViT-H-14 visual tower (632 M), calm_fast only, bf16 δ and bf16 autocast: shows that a
             larger backbone completes on one GPU (--model ViT-bigG-14 --grad-checkpointing for the
             largest: at batch 128 its bf16 activations alone exceed 80 GB).

Workload: open_clip.create_model(model, pretrained=None).visual (random weights). Eight synthetic
"fine-tuned" copies θt = θ0 + τt with τt = small dense noise (noise x RMS of each tensor) plus a
few larger coordinated changes (rank-4 updates of a random ~6 % of the matrices, coord x RMS).
Frozen random CLIP-style heads (centered, normalized features against random unit class vectors,
logit scale 100). Unlabeled data: synthetic images (per-task class prototypes + noise).

Variants, side by side in one process, on the same weights, pseudo-labels and batches:
  (a) authors  benchmarks/authors_scheme.py: the authors' scripts' data movement (fp32 θ0, τ_merged,
               τ_new, S, G on the CPU; θ rebuilt and uploaded every update; per-batch gradient
               copies through the CPU), fp32 forward/backward as in the scripts.
  (b) eager    benchmarks/eager_gpu.py: the same algorithm in plain eager PyTorch, all state on the
               device, no fused ops.
  (c) calm_fast calm_fast.merge(method="calm", step="authors") so that all three run the same update
               rule (lr 1e7, polarizing term, gradients summed).
Pseudo-labels are computed once with calm_fast's own CB-EMS code (calm_fast.sampling), and (a) and
(b) replay calm_fast's batch sampler (same generator and seed): the script checks that (c) saw
exactly the same batch sequence, and that the binary masks of (b) and (c) agree.

Measured per variant: per update, forward/backward time and element-wise time (for (a):
everything else in the update, i.e. element-wise work plus host<->device transfers), total wall
time, peak device memory (torch.cuda.max_memory_allocated) against a probe of model + grads +
activations (two fwd/bwd of one batch), reported as a multiple of the parameter bytes, and peak
host RSS (sampled every 10 ms, and VmHWM after /proc/self/clear_refs where allowed).
(c)'s per-update split comes from calm_fast's own report (its phase timer synchronizes the device
at the end of each phase, as (a) and (b) do here). A short probe times calm_fast internals
that run every update (the fused mask-step sweep, the "normalized" step-size reduction, the
per-parameter dispatch overhead) to back the notes in the report.

Targets (printed, not asserted): element-wise work <= 5 % of an update; whole run >= 5x faster than
(a); extra device memory <= 2 x parameter bytes beyond model + grads + activations; the vit-h
configuration completes on one GPU.

Output: benchmarks/results/e2e_<device>.json and .md (<device> = cpu, or cuda-<gpu name>; a
configuration other than that device's default gets a _<config> suffix), with device, driver,
torch/triton/open_clip versions and the exact command.

CPU runs fix glibc's mmap threshold (--malloc-mmap-threshold, default 1 MiB on CPU): by default
glibc raises it after the first large free, and what (a) allocates and frees then leaves a heap
in which the forward/backward of the variants that follow runs up to 3x slower (measured on 2
cores: fwd/bwd per update 11.8 / 10.5 / 3.2 s for a, b, c in that order; 3.6 s for (b) run
after (c); 4.6 / 5.1 / 5.2 s with the threshold fixed). Fixed, every variant sees the same
allocator and the comparison is fair; CUDA runs use the caching allocator and are unaffected.

open_clip needs torchvision; beside a CPU torch, the matching torchvision wheel may be a CUDA build
whose compiled ops do not load (`operator torchvision::nms does not exist` on import). The import
below defines the torchvision::nms / qnms schemas only when torchvision's own _C fails to load.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import calm_fast  # noqa: E402
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(ROOT))
    import calm_fast  # noqa: E402
from machine import command_output, cpu_model  # noqa: E402  (benchmarks/machine.py)
from calm_fast import CALMConfig, _extension, ops as cf_ops, sampling  # noqa: E402
from calm_fast.calm import CALMMerger  # noqa: E402

import authors_scheme  # noqa: E402  (benchmarks/authors_scheme.py)
from open_clip_compat import import_open_clip, torchvision_ops_stubbed  # noqa: E402
import eager_gpu  # noqa: E402  (benchmarks/eager_gpu.py)

GiB = 1 << 30
LOADAVG: list[float] = []  # 1-minute load average at the start and at the end (shared machines are noisy)
VARIANTS = {"a": "authors", "b": "eager", "c": "calm_fast"}
FULL_UPDATES = 100  # the authors' schedule, for projections of shortened runs

PRESETS = {
    "cpu-small": dict(device="cpu", model="ViT-B-32", image_size=64, batch_size=8, updates=3,
                      pool_size=24, classes=4, score_batch_size=64, variants="a,b,c",
                      delta_dtype="fp32", autocast=False),
    "vit-l": dict(device="cuda", model="ViT-L-14", image_size=224, batch_size=128, updates=100,
                  pool_size=320, classes=10, score_batch_size=256, variants="a,b,c",
                  delta_dtype="fp32", autocast=False),
    "vit-h": dict(device="cuda", model="ViT-H-14", image_size=224, batch_size=128, updates=100,
                  pool_size=320, classes=10, score_batch_size=256, variants="c",
                  delta_dtype="bf16", autocast=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_backbone(args) -> torch.nn.Module:
    """The open_clip visual tower of args.model, random weights (pretrained=None), fp32, CPU."""
    open_clip = import_open_clip()
    kwargs = {}
    if args.vision_width or args.vision_layers or args.patch_size:
        cfg = copy.deepcopy(open_clip.get_model_config(args.model))
        vision = cfg["vision_cfg"]
        for name, value in (("width", args.vision_width), ("layers", args.vision_layers),
                            ("patch_size", args.patch_size)):
            if value:
                vision[name] = value
        vision.pop("head_width", None) if args.vision_width else None
        vision["image_size"] = args.image_size
        kwargs["vision_cfg"] = vision
        kwargs["text_cfg"] = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(args.model, pretrained=None, force_image_size=args.image_size, **kwargs)
    visual = model.visual
    del model
    if args.grad_checkpointing:  # open_clip's own activation checkpointing (use_reentrant=False)
        visual.set_grad_checkpointing(True)
    return visual.float().eval()


# ---------------------------------------------------------------------------------------------
# synthetic workload


class SyntheticHead(torch.nn.Module):
    """Frozen CLIP-style head: logit_scale · <(f − μ)/‖f − μ‖, w_c> with random unit class vectors."""

    def __init__(self, dim: int, classes: int, gen: torch.Generator, logit_scale: float = 100.0):
        super().__init__()
        w = torch.randn(classes, dim, generator=gen)
        self.register_buffer("weight", w / w.norm(dim=1, keepdim=True))
        self.register_buffer("mu", torch.zeros(dim))
        self.logit_scale = logit_scale

    def forward(self, features):
        z = features.float() - self.mu
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.logit_scale * (z @ self.weight.t())


def synthetic_finetuned(theta0: dict, tasks: list[str], seed: int, noise: float, coord: float,
                        coord_fraction: float, device: torch.device) -> dict:
    """θt = θ0 + τt: dense noise (noise·rms) + rank-4 changes of ~coord_fraction of the matrices (coord·rms)."""
    out = {}
    for i, task in enumerate(tasks):
        gen = torch.Generator(device=device).manual_seed(seed * 1009 + 17 * (i + 1))
        pick = torch.Generator().manual_seed(seed * 7919 + i)
        state = {}
        for key, w in theta0.items():
            w_dev = w.to(device, torch.float32)
            ref = max(float(w_dev.square().mean().sqrt()), 0.02)
            tau = torch.randn(w.shape, generator=gen, device=device) * (noise * ref)
            if w.dim() == 2 and min(w.shape) >= 8 and float(torch.rand((), generator=pick)) < coord_fraction:
                rank = 4
                u = torch.randn(w.shape[0], rank, generator=gen, device=device)
                v = torch.randn(rank, w.shape[1], generator=gen, device=device)
                tau += (u @ v) * (coord * ref / math.sqrt(rank))
            state[key] = (w_dev + tau).to(w.dtype).cpu()
            del tau, w_dev
        out[task] = state
    return out


def synthetic_pools(tasks, pool_size: int, classes: int, image_size: int, seed: int) -> dict:
    """Per task: {"x": images [n, 3, s, s], "i": row index}; images = class prototype + noise."""
    pools = {}
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed * 31 + 1000 + i)
        protos = F.interpolate(torch.randn(classes, 3, 8, 8, generator=gen), size=image_size,
                               mode="bilinear", align_corners=False)
        cls = torch.arange(pool_size) % classes
        x = protos[cls] + 0.5 * torch.randn(pool_size, 3, image_size, image_size, generator=gen)
        pools[task] = {"x": x.contiguous(), "i": torch.arange(pool_size)}
    return pools


@dataclass
class Problem:
    keys: list[str]
    theta0: dict
    finetuned: dict
    heads: dict
    initial: list[str]
    sequential: list[str]
    config: CALMConfig
    device: torch.device
    template: torch.nn.Module
    pools: dict = field(default_factory=dict)
    selected: dict = field(default_factory=dict)  # task -> (kept row indices, pseudo-labels)
    num_params: int = 0

    def make_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.template)


class Sampler:
    """calm_fast's batch sampler (CALMMerger._sample), replayed: same generator, seed and order."""

    def __init__(self, problem: Problem, seed: int):
        self.p, self.gen, self.log = problem, torch.Generator().manual_seed(seed), []

    def next(self, task):
        keep, labels = self.p.selected[task]
        pick = torch.randperm(len(keep), generator=self.gen)[: self.p.config.batch_size]
        rows = keep[pick]
        self.log.append((task, rows))
        return self.p.pools[task]["x"][rows].to(self.p.device), labels[pick].to(self.p.device)


def expected_batches(problem: Problem, seed: int) -> list[torch.Tensor]:
    """The row indices of every mini-batch calm_fast draws, in order (no data moved)."""
    gen, rows, seen = torch.Generator().manual_seed(seed), [], list(problem.initial)
    for task in problem.sequential:
        seen.append(task)
        for _ in range(problem.config.updates):
            for t in seen:
                for _ in range(problem.config.batches_per_task):
                    keep = problem.selected[t][0]
                    rows.append(keep[torch.randperm(len(keep), generator=gen)[: problem.config.batch_size]])
    return rows


@torch.no_grad()
def pseudo_label(problem: Problem, log) -> float:
    """CB-EMS with calm_fast's own code, each task scored by its fine-tuned model (as merge() does)."""
    dev, cfg = problem.device, problem.config
    model = problem.make_model().to(dev)
    own = model.state_dict(keep_vars=True)
    start = time.perf_counter()
    for task in problem.finetuned:
        for key in problem.keys:
            own[key].data.copy_(problem.finetuned[task][key])
        h, y = sampling.score(lambda b: model(b["x"]), problem.heads[task], problem.pools[task],
                              cfg.score_batch_size, dev)
        keep = sampling.select_low_entropy(h, y, cfg.ratio, cfg.balanced)
        labels = y[keep]
        classes = torch.unique(labels)
        if len(classes) < 2:
            raise RuntimeError(f"e2e: task {task}: every pseudo-label is class {int(classes[0])}; "
                               f"use more --classes or --pool-size")
        problem.selected[task] = (keep, labels)
    _sync(dev)
    seconds = time.perf_counter() - start
    log(f"pseudo-labels: {seconds:.2f} s; kept per task "
        f"{ {t: len(k) for t, (k, _) in problem.selected.items()} }")
    return seconds


@torch.no_grad()
def calibrate_heads(problem: Problem) -> None:
    """μ of each head = mean θ0 feature of (up to) 64 of the task's images."""
    dev = problem.device
    model = problem.make_model().to(dev)
    for task, head in problem.heads.items():
        x = problem.pools[task]["x"][:64].to(dev)
        head.mu.copy_(model(x).float().mean(0))


# ---------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Memory:
    """Peak device memory (allocator) and peak host RSS over a region.

    Host: VmHWM after resetting it through /proc/self/clear_refs (exact, no sampling thread);
    where that is refused, a thread samples the RSS every 10 ms instead."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.result: dict = {}

    def __enter__(self):
        gc.collect()
        _malloc_trim()  # give freed heap back to the OS, so that RSS starts from what is live
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.dev_start = torch.cuda.memory_allocated(self.device)
        try:  # resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = _vm_hwm() is not None
        except OSError:
            self.hwm_reset = False
        self.rss_start = _rss()
        self.rss_peak = self.rss_start
        self.thread = None
        if not self.hwm_reset:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.rss_peak = max(self.rss_peak, _rss())
            self.stop.wait(self.interval)

    def __exit__(self, *exc):
        _sync(self.device)
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
        self.rss_peak = max(self.rss_peak, _rss())
        hwm = _vm_hwm() if self.hwm_reset else None
        peak_rss = max(self.rss_peak, hwm or 0)
        self.result = {"rss_start_bytes": self.rss_start, "rss_peak_bytes": peak_rss,
                       "rss_peak_delta_bytes": peak_rss - self.rss_start,
                       "rss_peak_source": "VmHWM after clear_refs" if hwm else "10 ms sampling"}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result.update(device_start_bytes=self.dev_start, device_peak_bytes=peak,
                               device_peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device))
        return False


def memory_probe(problem: Problem, log) -> dict:
    """Model + grads + activations: two fwd/bwd of one batch (also the warm-up of every kernel)."""
    dev, cfg = problem.device, problem.config
    task = problem.initial[0] if problem.initial else problem.sequential[0]
    sampler = Sampler(problem, seed=12345)
    with Memory(dev) as mem:
        model = problem.make_model().to(dev)
        for p in model.parameters():
            p.requires_grad_(True)
        start = None
        for i in range(3):
            if i == 1:
                _sync(dev)
                start = time.perf_counter()
            x, y = sampler.next(task)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                loss = F.cross_entropy(problem.heads[task](model(x)).float(), y)
            loss.backward()
        _sync(dev)
        per_batch = (time.perf_counter() - start) / 2
    del model
    out = dict(mem.result, seconds_per_batch=per_batch)
    log(f"probe (model + grads + activations, {cfg.batch_size} images): {per_batch * 1e3:.1f} ms per "
        f"fwd/bwd batch" + (f", peak {out['device_peak_bytes'] / GiB:.2f} GiB" if dev.type == "cuda" else ""))
    return out


# ---------------------------------------------------------------------------------------------
# variants


def run_calm_fast(problem: Problem, seed: int, count_syncs: bool) -> dict:
    """(c): calm_fast.merge on the same weights, heads and data; records the batches it draws."""
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
    _sync(problem.device)
    wall = time.perf_counter() - start
    rep, cfg = result.report, problem.config
    sec = dict(rep.seconds)
    n_updates = cfg.updates * len(problem.sequential)
    # per-update wall times from the first forward call of each update (calm_fast's phase timer
    # synchronizes at the end of each update, so consecutive starts bound one whole update)
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
    masks = {task: {k: cf_ops.unpack_mask(bits, problem.theta0[k].numel()).reshape(problem.theta0[k].shape).cpu()
                    for k, bits in step_masks.items()}
             for task, step_masks in result.masks.bits.items()}
    phases = {"merge_wall_s": wall, **{f"{k}_s": v for k, v in sec.items()}}
    per_update = {"fwd_bwd_s": sec.get("forward_backward", 0.0) / max(n_updates, 1),
                  "elementwise_s": sec.get("mask_step", 0.0) / max(n_updates, 1)}
    per_update["total_s"] = per_update["fwd_bwd_s"] + per_update["elementwise_s"]
    out = {"phases": phases, "updates": updates, "per_update_from_report": per_update, "masks": masks,
           "no_grad_keys": rep.no_grad_keys, "recorded_batches": [r.cpu() for r in recorded],
           "mask_density": rep.mask_density, "pseudo_labels": rep.pseudo_labels,
           "backend": cf_ops.resolve_backend(problem.device)}
    if count_syncs and problem.device.type == "cuda":
        out["syncs_total"] = len(caught)
    del result, model
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


# ---------------------------------------------------------------------------------------------
# calm_fast internals that run every update: evidence for the notes


def probe_internals(problem: Problem, reps: int, log) -> dict:
    """Times, on model-shaped tensors: the fused mask_step_ sweep of an update, calm.py's
    normalized _step_size reduction, the eager (b) sweep, and the per-parameter dispatch cost."""
    dev, cfg = problem.device, problem.config
    gen = torch.Generator(device=dev).manual_seed(7)
    shapes = {k: problem.theta0[k].shape for k in problem.keys}
    tensors, logits, deltas = {}, {}, {}
    for k, shape in shapes.items():
        t = torch.nn.Parameter(torch.randn(shape, generator=gen, device=dev) * 0.02)
        t.grad = torch.randn(shape, generator=gen, device=dev) * 1e-6
        tensors[k] = t
        logits[k] = torch.randn(shape, generator=gen, device=dev) * 4
        deltas[k] = (torch.randn(shape, generator=gen, device=dev) * 1e-3).to(cfg.delta_dtype)

    def fused():
        for k, t in tensors.items():
            cf_ops.mask_step_(logits[k], t.data, t.grad, deltas[k], lr=1e-3, l1=cfg.l1, reg=cfg.reg)

    merger_view = types.SimpleNamespace(config=CALMConfig(step="normalized"), tensors=tensors, device=dev)

    def step_size():
        return CALMMerger._step_size(merger_view, logits, deltas)

    base = {k: t.detach().clone() for k, t in tensors.items()}
    eager_view = types.SimpleNamespace(cfg=dataclass_replace(cfg, step="authors", lr=1e-3), S=logits,
                                       delta=deltas, base=base, tensors=tensors, dev=dev)

    def eager_sweep():
        eager_gpu.EagerCALM.mask_step(eager_view)

    tiny = {k: (torch.zeros(1, device=dev), torch.zeros(1, device=dev), torch.zeros(1, device=dev),
                torch.zeros(1, device=dev)) for k in shapes}

    def dispatch_only():  # the same loop over 1-element tensors: pure per-parameter overhead
        for s, w, g, d in tiny.values():
            cf_ops.mask_step_(s, w, g, d, lr=1e-3, l1=cfg.l1, reg=cfg.reg)

    out = {"tensors": len(shapes), "backend": cf_ops.resolve_backend(dev)}
    for name, fn in (("mask_step_sweep", fused), ("step_size_normalized", step_size),
                     ("eager_sweep", eager_sweep), ("dispatch_only", dispatch_only)):
        fn()
        _sync(dev)
        times = []
        for _ in range(reps):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = statistics.median(times) * 1e3
        if dev.type == "cuda":
            gc.collect()
            _sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            _sync(dev)
            out[f"{name}_extra_device_bytes"] = torch.cuda.max_memory_allocated(dev) - before
            out[f"{name}_syncs"] = len(w)
    n = sum(math.prod(s) for s in shapes.values())
    es = torch.tensor([], dtype=cfg.delta_dtype).element_size()
    out["mask_step_bytes_min"] = n * (4 + 4 + 4 + 4 + es + 4)  # read S θ g δ, write S θ
    out["mask_step_effective_gbps"] = out["mask_step_bytes_min"] / (out["mask_step_sweep_ms"] * 1e-3) / 1e9
    log("internals: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    del tensors, logits, deltas, base, tiny
    return out


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------------------------------------
# metadata and output
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


def fix_malloc_mmap_threshold(nbytes: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD, nbytes): a fixed threshold, which also turns off glibc's
    dynamic raising of it."""
    import ctypes

    if not ctypes.CDLL("libc.so.6").mallopt(-3, nbytes):  # -3 = M_MMAP_THRESHOLD
        raise SystemExit(f"e2e: mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def metadata(args, argv, device) -> dict:
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "device_type": device.type,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "host_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "open_clip_torch": _version("open_clip_torch"),
        "torchvision": _version("torchvision"),
        "torchvision_ops_stubbed": torchvision_ops_stubbed(),
        "calm_fast_native": _extension.NATIVE,
        "calm_fast_native_cuda": _extension.NATIVE_CUDA,
        "calm_fast_backend": cf_ops.resolve_backend(device),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc dynamic",
        "loadavg_start_end": [round(x, 2) for x in LOADAVG],
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/e2e_calm.py"] + list(argv)),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(command_output(["git", "status", "--porcelain", "--", "calm_fast", "csrc", "kernels"])),
    }
    if device.type == "cuda":
        smi = command_output(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader", f"--id={device.index or 0}"])
        meta["nvidia_smi"] = smi
        meta["driver"] = smi.split(",")[0].strip() if smi else None
        meta["cuda_runtime"] = torch.version.cuda
        meta["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 1)
    else:
        meta["driver"] = None
    return meta


def _fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def markdown(payload: dict) -> str:
    m, w, rows = payload["metadata"], payload["workload"], payload["variants"]
    pb = w["param_bytes"]
    lines = [f"# End-to-end CALM benchmark: {w['config']} on {m['device']}", "",
             f"Command: `{m['command']}`  ",
             f"Date {m['date']}, git {m['git']}{' (dirty)' if m['git_dirty'] else ''}; torch {m['torch']}, "
             f"triton {m['triton']}, open_clip_torch {m['open_clip_torch']}, torchvision {m['torchvision']}"
             f"{' (ops stubbed)' if m['torchvision_ops_stubbed'] else ''}; driver {m['driver']}; "
             f"{m['cores']} cores, {m['torch_threads']} torch threads; calm_fast backend {m['calm_fast_backend']}; "
             f"TF32 matmul {m['tf32_matmul']}; 1-min load average at start/end {m['loadavg_start_end']}.", "",
             f"Workload: open_clip {w['model']} visual tower (random weights), {w['num_params']:,} merged scalars "
             f"({pb / GiB:.3f} GiB fp32 = 1 P), {w['image_size']} px, {len(w['tasks'])} tasks "
             f"({len(w['initial'])} by task arithmetic, sequential {w['sequential']}), {w['updates']} updates x "
             f"{w['batches_per_task']} batches of {w['batch_size']} per seen task (authors: {FULL_UPDATES}), "
             f"delta {w['delta_dtype']}, autocast {w['autocast']} (variant a: always fp32, as the scripts), "
             f"step 'authors' (lr {w['lr']:g}).", "",
             "| variant | fwd/bwd ms/update | element-wise ms/update | element-wise % | update ms | "
             "mask phase s | whole run s | projected full schedule s | peak device GiB | extra device (x P) | "
             "peak RSS GiB | RSS rise GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s, mem = r["summary"], r["memory"]
        pu = s["per_update_s"]
        lines.append(
            f"| {r['label']} | {pu['fwd_bwd_s'] * 1e3:.1f} | {pu['elementwise_s'] * 1e3:.1f} | "
            f"{_fmt(s['elementwise_fraction'] and 100 * s['elementwise_fraction'], '.1f')} | {pu['total_s'] * 1e3:.1f} | "
            f"{s['mask_phase_s']:.2f} | {s['whole_run_s']:.2f} | {s['projected_full_schedule_s']:.1f} | "
            f"{_fmt(mem.get('device_peak_bytes') and mem['device_peak_bytes'] / GiB)} | "
            f"{_fmt(r.get('extra_device_x_param'))} | {mem['rss_peak_bytes'] / GiB:.2f} | "
            f"{mem['rss_peak_delta_bytes'] / GiB:.2f} |")
    lines.append("")
    lines.append("For (a), 'element-wise' is everything in an update but forward/backward: the CPU rebuild of θ, "
                 "uploads of θ and (per batch) τ_merged and τ_new, gradient copies down to the CPU, the CPU mask update. "
                 "Whole run: (c) is the calm_fast.merge() call (validation, pseudo-labels, initial merge, steps, output); "
                 "(a) and (b) add the shared pseudo-labelling time "
                 f"({payload['pseudo_label_s']:.2f} s, calm_fast.sampling on the same device) to their own run. "
                 "Projected: measured run + (100 − updates) x the measured mean update time of each step.")
    if "calm_fast" in rows:
        ph = rows["calm_fast"]["phases"]
        lines.append("")
        lines.append("(c) calm_fast.merge() phases (its report, s): " + ", ".join(
            f"{k[:-2]} {v:.2f}" for k, v in ph.items() if k != "merge_wall_s")
            + f"; outside any phase (validation, pool collection, output copy) "
              f"{rows['calm_fast']['summary'].get('outside_phases_s', 0.0):.2f}.")
    lines.append("")
    if payload.get("probe"):
        p = payload["probe"]
        lines.append(f"Memory/time probe (model + grads + activations, 2 fwd/bwd of one batch): "
                     f"{p['seconds_per_batch'] * 1e3:.1f} ms per batch"
                     + (f", peak {p['device_peak_bytes'] / GiB:.2f} GiB = {p['device_peak_bytes'] / pb:.2f} P"
                        if 'device_peak_bytes' in p else "") + ".")
        lines.append("")
    if payload["ratios"]:
        lines.append("| ratio | per update | element-wise per update | mask phase | whole run | projected full schedule |")
        lines.append("|---|---|---|---|---|---|")
        for name, r in payload["ratios"].items():
            lines.append(f"| {name} | {_fmt(r['per_update'])} | {_fmt(r['elementwise'])} | {_fmt(r['mask_phase'])} | "
                         f"{_fmt(r['whole_run'])} | {_fmt(r['projected_full_schedule'])} |")
        lines.append("")
    ch = payload["checks"]
    lines.append(f"Checks: (c) drew the same batch sequence as the replay used by (a)/(b): "
                 f"{ch.get('batch_sequence_identical')}; masks (b) vs (c): {ch.get('masks_b_vs_c')}; "
                 f"(a) vs (c): {ch.get('masks_a_vs_c')} (the scripts' initial mask takes k − 1 entries, strict >); "
                 f"pseudo-label counts equal to (c)'s report: {ch.get('pseudo_labels_match')}.")
    lines.append("")
    lines.append("Targets (evaluated on this run; GPU targets are indicative only on a CPU):")
    lines.append("")
    for t in payload["targets"]:
        lines.append(f"- {t['name']}: {t['value']} -> {t['status']}")
    cf = rows.get("calm_fast")
    if cf is not None and cf.get("syncs_total") is not None:
        per = [u["syncs"] for u in cf["updates_detail"] if u.get("syncs") is not None]
        lines.append("")
        lines.append(f"(c) implicit device synchronizations (torch.cuda sync debug mode): {cf['syncs_total']} in the "
                     f"whole merge; per update {_fmt(per and statistics.fmean(per), '.1f')} "
                     f"(host-to-device batch copies from pageable memory count as one each).")
    if payload.get("internals"):
        i = payload["internals"]
        lines.append("")
        lines.append(f"calm_fast internals per update ({i['tensors']} tensors, backend {i['backend']}): fused mask_step_ "
                     f"sweep {i['mask_step_sweep_ms']:.2f} ms ({i['mask_step_effective_gbps']:.1f} GB/s of the minimal "
                     f"traffic), normalized _step_size {i['step_size_normalized_ms']:.2f} ms, eager (b) sweep "
                     f"{i['eager_sweep_ms']:.2f} ms, dispatch only (1-element tensors) {i['dispatch_only_ms']:.2f} ms"
                     + (f"; syncs: _step_size {i.get('step_size_normalized_syncs')}, mask_step_ sweep "
                        f"{i.get('mask_step_sweep_syncs')}; extra device bytes: _step_size "
                        f"{i.get('step_size_normalized_extra_device_bytes')}, mask_step_ sweep "
                        f"{i.get('mask_step_sweep_extra_device_bytes')}" if "mask_step_sweep_syncs" in i else "") + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--device", help="cpu or cuda (default: the configuration's)")
    ap.add_argument("--model", help="open_clip model name (visual tower only is used)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--vision-width", type=int, help="override the tower's width (a smaller open_clip config)")
    ap.add_argument("--vision-layers", type=int, help="override the tower's depth")
    ap.add_argument("--patch-size", type=int, help="override the patch size")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--initial", type=int, default=6, help="tasks merged by task arithmetic; the rest are sequential")
    ap.add_argument("--updates", type=int, help="mask updates per sequential step (authors: 100)")
    ap.add_argument("--batches-per-task", type=int, default=2)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--pool-size", type=int, help="unlabeled images per task")
    ap.add_argument("--classes", type=int, help="classes per task head")
    ap.add_argument("--score-batch-size", type=int)
    ap.add_argument("--sparsity", type=float, default=1e-5, help="initial mask: top-k fraction of |τ|")
    ap.add_argument("--noise", type=float, default=0.01, help="dense noise of τ, x RMS of each tensor")
    ap.add_argument("--coord", type=float, default=0.1, help="coordinated rank-4 changes of τ, x RMS")
    ap.add_argument("--coord-fraction", type=float, default=0.06, help="fraction of matrices changed that way")
    ap.add_argument("--logit-scale", type=float, default=100.0, help="heads' logit scale (CLIP: 100)")
    ap.add_argument("--variants", help="comma-separated subset of a,b,c (default: the configuration's)")
    ap.add_argument("--delta-dtype", choices=sorted(DTYPES), help="δ storage of (b) and (c)")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast forward/backward in (b) and (c); (a) stays fp32 as the scripts")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="open_clip activation checkpointing in every variant (ViT-bigG-14 at batch 128 "
                         "needs it on an 80 GB GPU: its activations alone are ~100 GB in bf16)")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 matmuls (all variants); default: torch's defaults, as in the scripts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="glibc M_MMAP_THRESHOLD for the whole run (default: 1 MiB on CPU, untouched on "
                         "CUDA; 0 leaves glibc's dynamic threshold), see the module docstring")
    ap.add_argument("--no-internals", action="store_true", help="skip the calm_fast internals probe")
    ap.add_argument("--no-sync-count", action="store_true", help="CUDA: do not count synchronizations in (c)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder")
    ap.add_argument("--name", help="output file stem (default e2e_<device>[_<config>])")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.config].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from a, b, c")
    if not 0 <= args.initial < args.tasks:
        ap.error("--initial must be in [0, --tasks)")
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"e2e: --config {args.config} needs a CUDA device (none visible); "
                         f"use --config cpu-small or --device cpu")
    if args.tf32:  # otherwise torch's defaults, as in the scripts (TF32 off for matmuls, on for cuDNN)
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_mmap_threshold is None:
        args.malloc_mmap_threshold = (1 << 20) if device.type == "cpu" else 0
    if args.malloc_mmap_threshold:
        fix_malloc_mmap_threshold(args.malloc_mmap_threshold)
    LOADAVG[:] = [os.getloadavg()[0]]
    torch.backends.cudnn.allow_tf32 = args.tf32

    t_setup = time.perf_counter()
    template = build_backbone(args)
    theta0 = {k: v.detach().clone() for k, v in template.state_dict().items()}
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    num_params = sum(theta0[k].numel() for k in keys)
    tasks = [f"task{i}" for i in range(args.tasks)]
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    finetuned = synthetic_finetuned(theta0, tasks, args.seed, args.noise, args.coord, args.coord_fraction, gen_device)
    pools = synthetic_pools(tasks, args.pool_size, args.classes, args.image_size, args.seed)
    head_gen = torch.Generator().manual_seed(args.seed + 99)
    out_dim = getattr(template, "output_dim", None) or template(pools[tasks[0]]["x"][:1]).shape[-1]
    heads = {t: SyntheticHead(out_dim, args.classes, head_gen, args.logit_scale).to(device).eval().requires_grad_(False) for t in tasks}
    config = CALMConfig(initial=tuple(tasks[: args.initial]), sequential=tuple(tasks[args.initial:]),
                        updates=args.updates, batches_per_task=args.batches_per_task, batch_size=args.batch_size,
                        step="authors", sparsity=args.sparsity, delta_dtype=DTYPES[args.delta_dtype],
                        autocast=args.autocast, score_batch_size=args.score_batch_size)
    problem = Problem(keys=keys, theta0=theta0, finetuned=finetuned, heads=heads, initial=list(config.initial),
                      sequential=list(config.sequential), config=config, device=device, template=template,
                      pools=pools, num_params=num_params)
    calibrate_heads(problem)
    log(f"e2e {args.config}: {args.model} visual tower, {num_params:,} params, {len(keys)} tensors, device {device}; "
        f"setup {time.perf_counter() - t_setup:.1f} s")

    pseudo_label_s = pseudo_label(problem, log)
    probe = memory_probe(problem, log)
    param_bytes = num_params * 4
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

    internals = None
    if not args.no_internals:
        internals = probe_internals(problem, reps=20 if device.type == "cuda" else 3, log=log)
    LOADAVG.append(os.getloadavg()[0])

    # checks
    checks = {}
    c = variants.get("calm_fast")
    if c is not None:
        want = expected_batches(problem, args.seed)
        got = c["result"]["recorded_batches"]
        checks["batch_sequence_identical"] = len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))
        report_counts = c["result"]["pseudo_labels"]
        mine = {t: dict(zip(*[x.tolist() for x in torch.unique(lab, return_counts=True)]))
                for t, (_, lab) in problem.selected.items()}
        checks["pseudo_labels_match"] = report_counts == mine
        for v, name in (("b", "eager"), ("a", "authors")):
            if name in variants:
                cmp = compare_masks(c["result"]["masks"], variants[name]["result"]["masks"])
                checks[f"masks_{v}_vs_c"] = {t: f"{d['differ']} of {d['total']} differ ({d['on_ref']} on in (c))"
                                             for t, d in cmp.items()}
                checks[f"masks_{v}_vs_c_differ"] = sum(d["differ"] for d in cmp.values())
                checks[f"masks_{v}_vs_c_keys_missing"] = sum(len(d["keys_missing"]) for d in cmp.values())
        if "eager" in variants:
            checks["no_grad_keys_b_vs_c"] = variants["eager"]["result"]["no_grad_keys"] == c["result"]["no_grad_keys"]

    ratios = {}
    for other in ("authors", "eager"):
        if other in variants and c is not None:
            a, s = variants[other]["summary"], c["summary"]

            def r(x, y):
                return x / y if y else None

            ratios[f"({'a' if other == 'authors' else 'b'}) {other} / (c) calm_fast"] = {
                "per_update": r(a["per_update_s"]["total_s"], s["per_update_s"]["total_s"]),
                "elementwise": r(a["per_update_s"]["elementwise_s"], s["per_update_s"]["elementwise_s"]),
                "mask_phase": r(a["mask_phase_s"], s["mask_phase_s"]),
                "whole_run": r(a["whole_run_s"], s["whole_run_s"]),
                "projected_full_schedule": r(a["projected_full_schedule_s"], s["projected_full_schedule_s"])}

    targets = []
    if c is not None:
        frac = c["summary"]["elementwise_fraction"]
        targets.append({"name": "element-wise work <= 5 % of an update ((c))",
                        "value": _fmt(frac and 100 * frac, ".2f") + " %",
                        "status": "n/a" if frac is None else ("met" if frac <= 0.05 else "NOT met")})
        key = "(a) authors / (c) calm_fast"
        if key in ratios:
            val = ratios[key]["projected_full_schedule"]
            targets.append({"name": "whole run >= 5x faster than (a) (projected to the full schedule)",
                            "value": f"{_fmt(val)}x (measured run: {_fmt(ratios[key]['whole_run'])}x)",
                            "status": "n/a" if val is None else ("met" if val >= 5 else "NOT met")})
        if device.type == "cuda":
            x = c["extra_device_x_param"]
            targets.append({"name": "extra device memory <= 2 P beyond model + grads + activations ((c))",
                            "value": f"{x:.2f} P ({c['extra_device_bytes'] / GiB:.2f} GiB)",
                            "status": "met" if x <= 2.0 else "NOT met"})
        else:
            targets.append({"name": "extra device memory <= 2 P beyond model + grads + activations ((c))",
                            "value": "no device memory on a CPU run", "status": "n/a"})
        large = args.config == "vit-h" or (args.model not in ("ViT-B-32", "ViT-L-14") and not args.vision_width)
        targets.append({"name": "a larger backbone (ViT-H-14 / ViT-bigG-14, bf16 δ + autocast) completes on one GPU",
                        "value": f"{args.model} completed on {device}" if large else "not this configuration (--config vit-h)",
                        "status": ("met" if device.type == "cuda" else "n/a (CPU)") if large else "n/a"})

    workload = {"config": args.config, "model": args.model, "image_size": args.image_size,
                "vision_overrides": {k: getattr(args, k) for k in ("vision_width", "vision_layers", "patch_size")
                                     if getattr(args, k)},
                "num_params": num_params, "num_tensors": len(keys), "param_bytes": param_bytes,
                "tasks": tasks, "initial": problem.initial, "sequential": problem.sequential,
                "updates": args.updates, "full_updates": FULL_UPDATES, "batches_per_task": args.batches_per_task,
                "batch_size": args.batch_size, "pool_size": args.pool_size, "classes": args.classes,
                "sparsity": args.sparsity, "noise": args.noise, "coord": args.coord,
                "coord_fraction": args.coord_fraction, "delta_dtype": args.delta_dtype, "autocast": args.autocast,
                "tf32": args.tf32, "grad_checkpointing": args.grad_checkpointing, "lr": config.step_size, "seed": args.seed,
                "kept_per_task": {t: len(k) for t, (k, _) in problem.selected.items()}}
    drop = ("masks", "recorded_batches")
    payload = {
        "metadata": metadata(args, argv, device), "workload": workload, "pseudo_label_s": pseudo_label_s,
        "probe": probe,
        "variants": {name: {**{k: v for k, v in row.items() if k != "result"},
                            "phases": row["result"]["phases"], "updates_detail": row["result"]["updates"],
                            **{k: v for k, v in row["result"].items()
                               if k not in drop and k not in ("phases", "updates")}}
                     for name, row in variants.items()},
        "ratios": ratios, "checks": checks, "targets": targets, "internals": internals,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_config = "cpu-small" if device.type == "cpu" else "vit-l"
    stem = args.name or (f"e2e_{device_slug(device)}" + ("" if args.config == default_config else f"_{args.config}"))
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    md = markdown(payload)
    (out / f"{stem}.md").write_text(md)
    log("")
    log(md)
    log(f"wrote {out / stem}.json and .md")
    payload["_masks"] = {name: row["result"]["masks"] for name, row in variants.items()}
    payload["_paths"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    return payload


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    main()
