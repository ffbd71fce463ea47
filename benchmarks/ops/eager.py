"""Eager-PyTorch baselines: how research code (the CALM authors' scripts and their kin) writes
each calm_fast op. One function per op, same inputs as the calm_fast op (calm_fast/ops.py).

These are deliberately NOT optimised: separate kernels, N-sized temporaries, torch.stack /
torch.cat of whole models, in the style of github.com/yankd22/CALM (src/mask_merging.py) and
the usual TIES / TALL-mask merging scripts. They are the "eager" column of the op benchmark
(benchmarks/ops), and torch.compile of these same functions is its "compile" column.

They compute the same function as calm_fast.reference up to summation order, with two
documented differences:
- magnitude_threshold returns only the threshold (k-th largest |x|, what the scripts use),
  not the per-tensor tie quotas, and costs a torch.cat of |x| over the whole model + topk.
- consensus_merge sums the stacked task vectors with torch.sum(dim=0), whose order may differ
  from the kernels' task 0..T-1 order in the last bit (a TIES sign election on a sum that is
  ~0 can then differ on a handful of scalars).
"""
from __future__ import annotations

import torch


def mask_step_(logits, weight, grad, delta, base=None, *, lr: float, l1: float = 1.0,
               reg: str = "polarize") -> None:
    """S <- S - lr*g*delta*sig'(S) + reg;  theta <- base + sig(S_new)*delta, in place.

    As the scripts do it: G = lr * g * delta as its own tensor, sigmoid evaluated twice for
    the derivative, the polarizing term via torch.where, then theta rebuilt from base.
    """
    S = logits
    d = delta.float()
    G = lr * grad.float() * d
    derivative = torch.sigmoid(S) * (1 - torch.sigmoid(S))
    if base is None:  # the op's contract: base = theta - sig(S_old) * delta
        b = weight.float() - torch.sigmoid(S) * d
    else:
        b = base.float()
    if reg == "polarize":
        reg_term = l1 * torch.where(S > 0, derivative, -derivative)
    elif reg == "l1":
        reg_term = -l1 * derivative
    else:
        reg_term = torch.zeros_like(S)
    S_new = S - (G * derivative - reg_term)
    theta = b + torch.sigmoid(S_new) * d
    logits.copy_(S_new)
    weight.copy_(theta)


def mask_grad_sumsq(logits, grad, delta):
    """sum((g * delta * sig'(S))^2), as the normalized step's eager loop wrote it per parameter."""
    p = torch.sigmoid(logits)
    return (grad.float() * delta.float() * p * (1 - p)).square().sum()


def unpack_mask(packed, numel: int):
    """Bits of a uint8 vector, as research code unpacks them: shift, and, reshape, slice."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def masked_apply_(weight, delta, mask, mode: str = "hard") -> None:
    """theta <- theta + m * delta, m = sig(S) / round(sig(S)) / unpacked bits, in place."""
    if mode == "soft":
        frac = torch.sigmoid(mask)
    elif mode == "hard":
        frac = torch.round(torch.sigmoid(mask))  # the scripts' binarization
    else:
        frac = unpack_mask(mask, weight.numel()).reshape(weight.shape).float()
    weight.copy_(weight.float() + frac * delta.float())


def consensus_merge(task_vectors, weights, thresholds=(), method: str = "sum", min_votes: int = 0):
    """Task arithmetic / TIES / TALL-consensus over torch.stack of the T task vectors."""
    out_dtype = task_vectors[0].dtype
    stacked = torch.stack([t.float() for t in task_vectors])  # [T, N]: a T*N copy
    view = (-1,) + (1,) * (stacked.dim() - 1)
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device).reshape(view)
    if method == "sum":
        return (w * stacked).sum(dim=0).to(out_dtype)
    thr = torch.tensor(thresholds, dtype=torch.float32, device=stacked.device).reshape(view)
    if method == "ties":
        trimmed = torch.where(stacked.abs() >= thr, stacked, torch.zeros_like(stacked))
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        weighted = (w * trimmed * agree).sum(dim=0)
        count = agree.sum(dim=0).float()
        merged = torch.where(count > 0, weighted / count.clamp(min=1), torch.zeros_like(weighted))
        return merged.to(out_dtype)
    total = stacked.sum(dim=0)  # tau_MTL
    masks = stacked.abs() >= thr * (total.unsqueeze(0) - stacked).abs()
    votes = masks.sum(dim=0)
    merged = (w * stacked).sum(dim=0)
    return torch.where(votes >= min_votes, merged, torch.zeros_like(merged)).to(out_dtype)


def magnitude_threshold(tensors, k: int):
    """k-th largest |x| over a list of tensors: torch.cat of |x| over the model, then topk.

    Returns the threshold only (a 0-d tensor); the scripts then compare |x| > threshold.
    """
    if k == 0:
        return torch.tensor(float("inf"), dtype=tensors[0].dtype, device=tensors[0].device)
    abs_all = torch.cat([torch.abs(t).reshape(-1) for t in tensors])
    values, _ = torch.topk(abs_all, k)
    return values.min()


def entropy_argmax(logits):
    """Softmax entropy (fp32) and argmax (int64) per row: softmax, log_softmax, sum, argmax."""
    z = logits.float()
    probs = torch.softmax(z, dim=1)
    log_probs = torch.log_softmax(z, dim=1)
    entropy = -(probs * log_probs).sum(dim=1)
    return entropy, torch.argmax(z, dim=1)


def pack_mask(mask):
    """Bits 8 per byte via multiply-by-bit-weights and sum (bit i % 8 of byte i // 8)."""
    bits = (mask.reshape(-1) > 0).to(torch.uint8)
    n = bits.numel()
    if n % 8:
        bits = torch.cat([bits, bits.new_zeros(8 - n % 8)])
    bit_weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits.view(-1, 8) * bit_weights).sum(dim=1, dtype=torch.uint8)

