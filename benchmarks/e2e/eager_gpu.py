"""Variant (b) of the end-to-end benchmark: CALM in plain eager PyTorch, all state on the device.

The same algorithm and update rule as calm_fast.merge(method="calm") (and as the authors'
scripts), written the way a careful port of the scripts to the GPU would write it: no CPU
copies, no per-batch transfers, gradients accumulated by autograd in .grad, but no fused ops.

State on the device during a sequential step, beyond the model and its gradients:
  base = θ0 + τ_merged (fp32), δ = θj − base (CALMConfig.delta_dtype), S (fp32, one flat buffer
  with a view per parameter): three parameter-sized buffers, plus the N-sized |τj| concatenation
  and torch.topk at the start of the step, and per parameter ~8 element-wise kernels with
  parameter-sized temporaries at every update.
Per update: S ← S − lr·g·δ·σ'(S) + reg(S), θ ← base + σ(S)·δ, in separate torch ops per tensor.

It consumes the same pseudo-labelled batches in the same order as calm_fast (the runner's
sampler replays calm_fast's generator), uses the same exactly-k initial mask (top-k indices
over the whole model), and the same no-gradient rule (those parameters take 0.5·(τ_merged + τj)),
so its binary masks must agree with calm_fast's up to float rounding of θ (calm_fast recovers
base = θ − σ(S)·δ inside its fused kernel instead of storing it).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..harness import sync


def _reg(S, dsig, cfg):
    if cfg.reg == "polarize":  # sign(S)·σ'(S) with sign(0) = −1
        return cfg.l1 * torch.where(S > 0, 1.0, -1.0) * dsig
    if cfg.reg == "l1":
        return -cfg.l1 * dsig
    return torch.zeros_like(S)


class EagerCALM:
    def __init__(self, problem, sampler):
        self.p, self.sampler = problem, sampler
        self.cfg, self.dev = problem.config, problem.device
        self.model = problem.make_model().to(self.dev).eval()
        own = self.model.state_dict(keep_vars=True)
        self.tensors = {k: own[k] for k in problem.keys}
        for prm in self.model.parameters():
            prm.requires_grad_(False)
        for t in self.tensors.values():
            if isinstance(t, torch.nn.Parameter):
                t.requires_grad_(True)

    @torch.no_grad()
    def initial_merge(self, initial):
        """base = θ0 + λ Σ_initial τt, per parameter on the device."""
        self.base = {}
        for key in self.p.keys:
            theta0 = self.p.theta0[key].to(self.dev, torch.float32)
            acc = torch.zeros_like(theta0)
            for task in initial:
                acc = acc + self.cfg.init_scaling * (self.p.finetuned[task][key].to(self.dev, torch.float32) - theta0)
            self.base[key] = theta0 + acc

    @torch.no_grad()
    def init_step(self, task):
        cfg, keys = self.cfg, self.p.keys
        self.delta = {k: (self.p.finetuned[task][k].to(self.dev, torch.float32) - self.base[k]).to(cfg.delta_dtype)
                      for k in keys}
        abs_tau = torch.cat([(self.p.finetuned[task][k].to(self.dev, torch.float32)
                              - self.p.theta0[k].to(self.dev, torch.float32)).abs().reshape(-1) for k in keys])
        k_top = int(cfg.sparsity * abs_tau.numel())
        flat = torch.full_like(abs_tau, -cfg.sigmoid_bias)
        if k_top:
            flat[torch.topk(abs_tau, k_top, sorted=False).indices] = cfg.sigmoid_bias
        del abs_tau
        self.S, offset = {}, 0
        for k in keys:
            n = self.base[k].numel()
            self.S[k] = flat[offset:offset + n].view(self.base[k].shape)
            offset += n
        for k, t in self.tensors.items():
            t.data.copy_(self.base[k] + torch.sigmoid(self.S[k]) * self.delta[k].float())

    def forward_backward(self, seen):
        cfg = self.cfg
        for t in self.tensors.values():
            t.grad = None
        scale = 1.0 if cfg.accumulate == "sum" else 1.0 / (len(seen) * cfg.batches_per_task)
        for task in seen:
            for _ in range(cfg.batches_per_task):
                x, y = self.sampler.next(task)
                with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                    loss = F.cross_entropy(self.p.heads[task](self.model(x)).float(), y)
                (loss * scale).backward()

    @torch.no_grad()
    def mask_step(self):
        cfg = self.cfg
        lr = cfg.step_size
        if cfg.step == "normalized":
            sq, count = torch.zeros((), device=self.dev), 0
            for k, t in self.tensors.items():
                if t.grad is not None:
                    p = torch.sigmoid(self.S[k])
                    sq += (t.grad.float() * self.delta[k].float() * p * (1 - p)).square().sum()
                    count += t.numel()
            rms = (sq / max(count, 1)).sqrt().item()
            lr = cfg.step_size / rms if rms > 0 else 0.0
        for k, t in self.tensors.items():
            if t.grad is None:
                continue
            S = self.S[k]
            p = torch.sigmoid(S)
            dsig = p * (1 - p)
            d = self.delta[k].float()
            S_new = S - lr * t.grad.float() * d * dsig + _reg(S, dsig, cfg)
            t.data.copy_(self.base[k] + torch.sigmoid(S_new) * d)
            S.copy_(S_new)

    @torch.no_grad()
    def finalize(self):
        masks, no_grad = {}, []
        for k, t in self.tensors.items():
            if t.grad is None:
                no_grad.append(k)
                self.base[k] = self.base[k] + 0.5 * self.delta[k].float()
            else:
                m = self.S[k] > 0
                masks[k] = m.cpu()
                self.base[k] = self.base[k] + m * self.delta[k].float()
            t.grad = None
        del self.S, self.delta
        return masks, no_grad


def run(problem, sampler) -> dict:
    """Variant (b) over problem.initial / problem.sequential; same return shape as authors_scheme.run."""
    cfg, dev = problem.config, problem.device
    phases: dict[str, float] = {}
    t = time.perf_counter()
    eager = EagerCALM(problem, sampler)
    eager.initial_merge(problem.initial)
    sync(dev)
    phases["setup_and_initial_merge_s"] = time.perf_counter() - t
    phases["mask_init_s"] = phases["updates_s"] = phases["mask_finalize_s"] = 0.0
    masks, no_grad_keys, updates = {}, {}, []
    seen = list(problem.initial)
    for step, task in enumerate(problem.sequential):
        seen.append(task)
        t = time.perf_counter()
        eager.init_step(task)
        sync(dev)
        phases["mask_init_s"] += time.perf_counter() - t
        for update in range(cfg.updates):
            t0 = time.perf_counter()
            eager.forward_backward(seen)
            sync(dev)
            t1 = time.perf_counter()
            eager.mask_step()
            sync(dev)
            t2 = time.perf_counter()
            updates.append({"step": step, "task": task, "update": update, "seen": len(seen),
                            "batches": len(seen) * cfg.batches_per_task,
                            "fwd_bwd_s": t1 - t0, "elementwise_s": t2 - t1, "total_s": t2 - t0})
            phases["updates_s"] += t2 - t0
        t = time.perf_counter()
        masks[task], no_grad_keys[task] = eager.finalize()
        sync(dev)
        phases["mask_finalize_s"] += time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():  # final model: θ0 + τ_merged
        for k, tensor in eager.tensors.items():
            tensor.data.copy_(eager.base[k])
    sync(dev)
    phases["final_model_s"] = time.perf_counter() - t
    del eager
    return {"phases": phases, "updates": updates, "masks": masks, "no_grad_keys": no_grad_keys}
