"""Triton mask_step_, mask_grad_sumsq and masked_apply_: one pass, fp32 math, native-dtype storage."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calm_fast import _meta

from ._common import BLOCK, NUM_WARPS, block_offsets, device_guard, grid_1d, store_as

_REGS = {"polarize": 0, "l1": 1, "none": 2}
_MODES = {"soft": 0, "hard": 1, "packed": 2}


@triton.jit
def _mask_step_kernel(logits_ptr, weight_ptr, grad_ptr, delta_ptr, base_ptr, n, lr, l1,
                      HAS_BASE: tl.constexpr, REG: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    m = offs < n
    s = tl.load(logits_ptr + offs, mask=m, other=0.0)
    w = tl.load(weight_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(delta_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = tl.sigmoid(s)
    dsig = p * (1.0 - p)
    # Same association as the reference: ((lr * g) * d) * dsig, then + reg term.
    if REG == 0:  # polarize: l1 * sign(S) * sigma'(S), sign(0) = -1
        reg = l1 * tl.where(s > 0.0, 1.0, -1.0) * dsig
    elif REG == 1:  # l1 on sigma(S), descended
        reg = -l1 * dsig
    else:
        reg = tl.zeros_like(s)
    s_new = s - lr * g * d * dsig + reg
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    else:
        b = w - p * d
    w_new = b + tl.sigmoid(s_new) * d
    store_as(weight_ptr, offs, w_new, m)
    tl.store(logits_ptr + offs, s_new, mask=m)


def mask_step_(logits, weight, grad, delta, base, lr: float, l1: float, reg: str) -> None:
    """S <- S - lr·g·δ·σ'(S) + reg(S);  θ <- base + σ(S_new)·δ  (base = θ - σ(S_old)·δ if None)."""
    _meta.check_mask_step(logits, weight, grad, delta, base, reg)
    n = logits.numel()
    if n == 0:
        return
    has_base = base is not None
    with device_guard(logits):
        _mask_step_kernel[grid_1d(n)](
            logits, weight, grad, delta, base if has_base else weight, n, float(lr), float(l1),
            HAS_BASE=has_base, REG=_REGS[reg], BLOCK=BLOCK, num_warps=NUM_WARPS)


@triton.jit
def _mask_grad_sumsq_kernel(logits_ptr, grad_ptr, delta_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    m = offs < n
    s = tl.load(logits_ptr + offs, mask=m, other=0.0)
    g = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(delta_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = tl.sigmoid(s)
    v = g * d * (p * (1.0 - p))  # masked lanes load g = d = 0: v = 0
    tl.store(partial_ptr + tl.program_id(0), tl.sum(v * v, axis=0))


def mask_grad_sumsq(logits, grad, delta) -> torch.Tensor:
    """Σ (g·δ·σ'(S))²: per-program partial sums, then their sum (no atomics: reproducible)."""
    _meta.check_mask_grad_sumsq(logits, grad, delta)
    n = logits.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=logits.device)
    grid = grid_1d(n)
    partials = torch.empty(grid[0], dtype=torch.float32, device=logits.device)
    with device_guard(logits):
        _mask_grad_sumsq_kernel[grid](logits, grad, delta, partials, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partials.sum()


@triton.jit
def _masked_apply_kernel(weight_ptr, delta_ptr, mask_ptr, n, MODE: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    m = offs < n
    w = tl.load(weight_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(delta_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if MODE == 0:  # soft: sigma(S)
        mv = tl.sigmoid(tl.load(mask_ptr + offs, mask=m, other=0.0))
    elif MODE == 1:  # hard: [S > 0]
        mv = tl.where(tl.load(mask_ptr + offs, mask=m, other=0.0) > 0.0, 1.0, 0.0)
    else:  # packed: bit i % 8 of byte i // 8
        byte = tl.load(mask_ptr + offs // 8, mask=m, other=0).to(tl.int32)
        mv = ((byte >> (offs % 8).to(tl.int32)) & 1).to(tl.float32)
    store_as(weight_ptr, offs, w + mv * d, m)


def masked_apply_(weight, delta, mask, mode: str) -> None:
    """θ <- θ + m·δ, m = σ(S) (soft), [S > 0] (hard) or the bits of a packed mask (packed)."""
    _meta.check_masked_apply(weight, delta, mask, mode)
    n = weight.numel()
    if n == 0:
        return
    with device_guard(weight):
        _masked_apply_kernel[grid_1d(n)](weight, delta, mask, n, MODE=_MODES[mode], BLOCK=BLOCK,
                                         num_warps=NUM_WARPS)
