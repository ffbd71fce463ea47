"""CALM's stage 3 for one sequential task j: the consensus-aware mask over the merged model.

State per merged tensor (this process's part of it): the mask logits S (fp32) and
δ = θj − base (fp32 or bf16). The model's tensors hold θ = base + σ(S)·δ throughout.
"""
from __future__ import annotations

import torch

from .. import ops
from .config import CALMConfig
from .layout import Layout


@torch.no_grad()
def step_inputs(task: str, pretrained, finetuned, tensors: dict, config: CALMConfig, device,
                layout: Layout = Layout()) -> tuple[dict, dict]:
    """(|τj| staged in the logits buffers, δ = θj − θ) for every merged tensor, before any mask."""
    magnitudes, deltas = {}, {}
    for key, t in tensors.items():
        theta_j = layout.part(key, finetuned[task][key]).to(device, torch.float32)
        magnitudes[key] = (theta_j - layout.part(key, pretrained[key]).to(device, torch.float32)).abs_().contiguous()
        deltas[key] = (theta_j - layout.local(t)).to(config.delta_dtype).contiguous()
    return magnitudes, deltas


@torch.no_grad()
def initial_logits(magnitudes: dict, k: int, bias: float, layout: Layout = Layout()) -> dict:
    """In place, |τj| becomes +bias on exactly the k largest entries over the whole model and
    −bias elsewhere (ties broken in flat order, as ops.magnitude_threshold's quotas say)."""
    threshold, quota = layout.threshold(list(magnitudes), list(magnitudes.values()), k)
    threshold = float(threshold)
    for s, q in zip(magnitudes.values(), quota.tolist()):
        chosen = s > threshold
        if q:
            ties = torch.nonzero(s.reshape(-1) == threshold).flatten()[:q]
            chosen.view(-1)[ties] = True
        s.copy_(torch.where(chosen, bias, -bias))
    return magnitudes


@torch.no_grad()
def step_size(config: CALMConfig, logits: dict, tensors: dict, deltas: dict, layout: Layout = Layout()) -> float:
    """The update's logit step size: the authors' raw lr, or lr over the RMS of the gradient term
    g·δ·σ'(S) over every scalar a gradient reached (scale-free: the same lr fits any model)."""
    if config.step == "authors":
        return config.step_size
    sums, count = [], 0
    for key, t in tensors.items():
        grad = layout.local_grad(t)
        if grad is not None and layout.counted(key):
            sums.append(ops.mask_grad_sumsq(logits[key], grad, deltas[key]))
            count += grad.numel()
    return layout.step_size(sums, count, config.step_size)


@torch.no_grad()
def update(config: CALMConfig, logits: dict, tensors: dict, deltas: dict, lr: float, layout: Layout = Layout()) -> None:
    """One fused sweep per tensor: S -= lr·(g·δ·σ'(S) + regularizer), θ = base + σ(S)·δ."""
    for key, t in tensors.items():
        grad = layout.local_grad(t)
        if grad is not None:
            ops.mask_step_(logits[key], layout.local(t), grad, deltas[key], lr=lr, l1=config.l1, reg=config.reg)


@torch.no_grad()
def finished_masks(logits: dict, tensors: dict, layout: Layout = Layout()):
    """The step's binary masks m = [S > 0] for every tensor a gradient reached.

    Returns (this process's packed masks, the whole parameters' packed masks on the writing
    process, each parameter's count of kept scalars, the keys no gradient reached)."""
    reached = [key for key, t in tensors.items() if layout.local_grad(t) is not None]
    local = {key: ops.pack_mask(logits[key]) for key in reached}
    whole = {key: layout.packed_mask(key, logits[key]) for key in reached}
    on = layout.sum(torch.stack([(logits[key] > 0).sum() * layout.counted(key) for key in reached]) if reached
                    else torch.zeros(0, dtype=torch.int64))
    return local, whole, dict(zip(reached, on.tolist())), [key for key in tensors if key not in local]


class BestMasks:
    """The masks [S > 0] at the best check of a step's held-out agreement (config.holdout):
    a higher agreement replaces them, a tie keeps the earlier ones. Kept packed, one
    bit per scalar, so the stopping rule costs 1/32 of the logits' memory."""

    def __init__(self, patience: int | None):
        self.patience, self.agreement, self.update, self.bits, self.since = patience, -1.0, -1, {}, 0
        self.history: list[list[float]] = []  # [update, agreement] per check

    @torch.no_grad()
    def offer(self, update: int, agreement: float, logits: dict) -> bool:
        """Record a check; True when `patience` checks in a row found nothing better (stop the step)."""
        self.history.append([update, agreement])
        if agreement > self.agreement:
            self.agreement, self.update, self.since = agreement, update, 0
            self.bits = {key: ops.pack_mask(s) for key, s in logits.items()}
            return False
        self.since += 1
        return self.patience is not None and self.since >= self.patience

    @torch.no_grad()
    def restore(self, logits: dict, bias: float) -> None:
        """S = ±bias from the best check's masks: what finished_masks then reads."""
        for key, s in logits.items():
            on = ops.unpack_mask(self.bits[key], s.numel()).view(s.shape)
            s.copy_(torch.where(on, bias, -bias))
