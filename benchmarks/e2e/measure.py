"""What the end-to-end benchmark measures besides the variants themselves: peak memory of a
region, the model + gradients + activations probe, and calm_fast internals that run every update."""
from __future__ import annotations

import dataclasses
import gc
import math
import time
import types
import warnings

import torch
import torch.nn.functional as F

from calm_fast import CALMConfig, ops as cf_ops
from calm_fast.calm import step_size

from ..harness import GiB, MemoryWindow, median_seconds, sync
from . import eager_gpu
from .problem import Problem, Sampler


class Memory(MemoryWindow):
    """Peak device memory (allocator) and peak host RSS over a region: VmHWM after resetting it
    (exact, no sampling thread); where that is refused, the RSS sampled every 10 ms instead."""

    def __init__(self, device: torch.device):
        super().__init__(device, sample="fallback", interval=0.01)

    @property
    def result(self) -> dict:
        start = self.baseline["VmRSS"]
        out = {"rss_start_bytes": start, "rss_peak_bytes": self.peak_rss, "rss_peak_delta_bytes": self.peak_rss - start,
               "rss_peak_source": "VmHWM after clear_refs" if self.hwm_reset else "10 ms sampling"}
        if self.device.type == "cuda":
            out.update(device_start_bytes=self.device_start, device_peak_bytes=self.device_peak,
                       device_peak_reserved_bytes=self.device_peak_reserved)
        return out


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
                sync(dev)
                start = time.perf_counter()
            x, y = sampler.next(task)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                loss = F.cross_entropy(problem.heads[task](model(x)).float(), y)
            loss.backward()
        sync(dev)
        per_batch = (time.perf_counter() - start) / 2
    del model
    out = dict(mem.result, seconds_per_batch=per_batch)
    log(f"probe (model + grads + activations, {cfg.batch_size} images): {per_batch * 1e3:.1f} ms per "
        f"fwd/bwd batch" + (f", peak {out['device_peak_bytes'] / GiB:.2f} GiB" if dev.type == "cuda" else ""))
    return out


# ---------------------------------------------------------------------------------------------
# calm_fast internals that run every update: evidence for the notes


def _model_shaped(problem: Problem) -> tuple[dict, dict, dict]:
    """Parameters with gradients, mask logits and δ of the model's shapes, on the device."""
    dev, cfg = problem.device, problem.config
    gen = torch.Generator(device=dev).manual_seed(7)
    tensors, logits, deltas = {}, {}, {}
    for k in problem.keys:
        shape = problem.theta0[k].shape
        t = torch.nn.Parameter(torch.randn(shape, generator=gen, device=dev) * 0.02)
        t.grad = torch.randn(shape, generator=gen, device=dev) * 1e-6
        tensors[k] = t
        logits[k] = torch.randn(shape, generator=gen, device=dev) * 4
        deltas[k] = (torch.randn(shape, generator=gen, device=dev) * 1e-3).to(cfg.delta_dtype)
    return tensors, logits, deltas


def _internal_calls(problem: Problem, tensors: dict, logits: dict, deltas: dict) -> dict:
    """name -> the call timed: the fused mask_step_ sweep of an update, calm_fast's normalized
    step-size reduction, the eager (b) sweep, and the same fused loop over 1-element tensors."""
    dev, cfg = problem.device, problem.config

    def fused():
        for k, t in tensors.items():
            cf_ops.mask_step_(logits[k], t.data, t.grad, deltas[k], lr=1e-3, l1=cfg.l1, reg=cfg.reg)

    normalized = CALMConfig(step="normalized")
    base = {k: t.detach().clone() for k, t in tensors.items()}
    eager_view = types.SimpleNamespace(cfg=dataclasses.replace(cfg, step="authors", lr=1e-3), S=logits,
                                       delta=deltas, base=base, tensors=tensors, dev=dev)
    tiny = {k: tuple(torch.zeros(1, device=dev) for _ in range(4)) for k in tensors}

    def dispatch_only():  # pure per-parameter overhead
        for s, w, g, d in tiny.values():
            cf_ops.mask_step_(s, w, g, d, lr=1e-3, l1=cfg.l1, reg=cfg.reg)

    return {"mask_step_sweep": fused,
            "step_size_normalized": lambda: step_size(normalized, logits, tensors, deltas),
            "eager_sweep": lambda: eager_gpu.EagerCALM.mask_step(eager_view),
            "dispatch_only": dispatch_only}


def _device_cost(fn, dev) -> tuple[int, int]:
    """Extra device bytes and implicit synchronizations of one call."""
    gc.collect()
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - before, len(w)


def probe_internals(problem: Problem, reps: int, log) -> dict:
    """Times, on model-shaped tensors, the calls of _internal_calls (median of reps); on CUDA also
    their extra device bytes and synchronizations."""
    dev, cfg = problem.device, problem.config
    tensors, logits, deltas = _model_shaped(problem)
    out = {"tensors": len(tensors), "backend": cf_ops.resolve_backend(dev)}
    for name, fn in _internal_calls(problem, tensors, logits, deltas).items():
        out[f"{name}_ms"] = median_seconds(fn, dev, reps) * 1e3
        if dev.type == "cuda":
            out[f"{name}_extra_device_bytes"], out[f"{name}_syncs"] = _device_cost(fn, dev)
    n = sum(math.prod(problem.theta0[k].shape) for k in problem.keys)
    es = torch.tensor([], dtype=cfg.delta_dtype).element_size()
    out["mask_step_bytes_min"] = n * (4 + 4 + 4 + 4 + es + 4)  # read S θ g δ, write S θ
    out["mask_step_effective_gbps"] = out["mask_step_bytes_min"] / (out["mask_step_sweep_ms"] * 1e-3) / 1e9
    log("internals: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    del tensors, logits, deltas
    return out
