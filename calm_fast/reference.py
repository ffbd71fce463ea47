"""Plain-torch reference implementations of every calm_fast op.

These are the oracle the tests compare each kernel against, and the fallback used when the
compiled extension is absent. They favour obviousness over speed: fp32 arithmetic, explicit
temporaries, the same accumulation order as the kernels (task 0, 1, ..., T-1) so that
decisions taken on sums (TIES sign election, TALL votes) are bit-identical.
"""
from __future__ import annotations

import torch

from . import _meta

def _reg_term(logits: torch.Tensor, dsig: torch.Tensor, l1: float, reg: str) -> torch.Tensor:
    if reg == "polarize":  # the authors' term: sign(S)·σ'(S), sign(0) = -1
        return l1 * torch.where(logits > 0, 1.0, -1.0) * dsig
    if reg == "l1":  # a true L1 on σ(S): d/dS σ(S) = σ'(S), descended
        return -l1 * dsig
    return torch.zeros_like(logits)


def mask_step_(logits, weight, grad, delta, base, lr: float, l1: float, reg: str) -> None:
    """S <- S - lr·g·δ·σ'(S) + reg(S);  θ <- base + σ(S_new)·δ  (base = θ - σ(S_old)·δ if None)."""
    _meta.check_mask_step(logits, weight, grad, delta, base, reg)
    s = logits
    p = torch.sigmoid(s)
    dsig = p * (1 - p)
    d = delta.float()
    s_new = s - lr * grad.float() * d * dsig + _reg_term(s, dsig, l1, reg)
    b = base.float() if base is not None else weight.float() - p * d
    weight.copy_(b + torch.sigmoid(s_new) * d)
    logits.copy_(s_new)


def mask_grad_sumsq(logits, grad, delta) -> torch.Tensor:
    """Σ (g·δ·σ'(S))² as a 0-d fp32 tensor: the squared norm of the logit step's gradient term,
    which the normalized step rule divides by. Reads S, g, δ once; writes nothing."""
    _meta.check_mask_grad_sumsq(logits, grad, delta)
    p = torch.sigmoid(logits)
    step = grad.float() * delta.float() * (p * (1 - p))
    return step.square().sum()


def _mask_values(mask: torch.Tensor, mode: str, numel: int) -> torch.Tensor:
    if mode == "soft":
        return torch.sigmoid(mask).reshape(-1)
    if mode == "hard":
        return (mask > 0).float().reshape(-1)
    return unpack_mask(mask, numel).float()


def masked_apply_(weight, delta, mask, mode: str) -> None:
    """θ <- θ + m·δ, m = σ(S) (soft), [S > 0] (hard) or the bits of a packed mask (packed)."""
    _meta.check_masked_apply(weight, delta, mask, mode)
    m = _mask_values(mask, mode, weight.numel()).reshape(weight.shape)
    weight.copy_(weight.float() + m * delta.float())


def consensus_merge(task_vectors, weights, thresholds, method: str, min_votes: int):
    """One merged task vector from T task vectors of one parameter (see README, op 3)."""
    _meta.check_consensus_merge(task_vectors, weights, thresholds, method, min_votes)
    out_dtype = task_vectors[0].dtype
    taus = [t.float() for t in task_vectors]
    weighted = torch.zeros_like(taus[0])
    if method == "sum":
        for w, tau in zip(weights, taus):
            weighted = weighted + w * tau
        return weighted.to(out_dtype)
    if method == "ties":
        kept = [torch.where(tau.abs() >= thr, tau, 0.0) for tau, thr in zip(taus, thresholds)]
        trimmed_sum = torch.zeros_like(taus[0])
        for k in kept:
            trimmed_sum = trimmed_sum + k
        elected = torch.sign(trimmed_sum)
        count = torch.zeros_like(taus[0])
        for w, k in zip(weights, kept):
            agree = (torch.sign(k) == elected) & (k != 0)
            weighted = weighted + torch.where(agree, w * k, 0.0)
            count = count + agree.float()
        return torch.where(count > 0, weighted / count.clamp(min=1), 0.0).to(out_dtype)
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total = total + tau
    votes = torch.zeros_like(taus[0])
    for w, tau, thr in zip(weights, taus, thresholds):
        votes = votes + (tau.abs() >= thr * (total - tau).abs()).float()
        weighted = weighted + w * tau
    return torch.where(votes >= min_votes, weighted, 0.0).to(out_dtype)


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """|x| as its IEEE bit pattern (int64): for non-negative floats, bit order = value order."""
    bits_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    sign_mask = {torch.float32: 0x7FFFFFFF, torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF}
    bits = t.reshape(-1).view(bits_dtype[t.dtype]).to(torch.int64)
    return bits & sign_mask[t.dtype]


def magnitude_threshold(tensors, k: int):
    """k-th largest |x| over a list of tensors, and per-tensor counts of ties to select.

    Returns (threshold, tie_quota): exactly k entries are selected by taking every |x| > threshold
    plus, in each tensor i, the first tie_quota[i] entries (flat order) with |x| == threshold;
    quotas are filled in tensor order. NaN orders above +inf (IEEE bit order). k = 0 gives
    threshold = +inf and no ties.
    """
    _meta.check_magnitude_threshold(tensors, k)
    dtype = tensors[0].dtype
    device = tensors[0].device
    quota = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    if k == 0:
        return torch.tensor(float("inf"), dtype=dtype, device=device), quota
    bits = [_magnitude_bits(t) for t in tensors]
    kth_bits = torch.cat(bits).sort(descending=True).values[k - 1]
    greater = sum(int((b > kth_bits).sum()) for b in bits)
    ties_needed = k - greater
    for i, b in enumerate(bits):
        take = min(ties_needed, int((b == kth_bits).sum()))
        quota[i] = take
        ties_needed -= take
    scalar_bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    threshold = kth_bits.to(scalar_bits).reshape(1).view(dtype).reshape(())
    return threshold, quota


def entropy_argmax(logits):
    """Per row of [B, C] logits: softmax entropy (fp32) and the first index of the max (int64)."""
    _meta.check_entropy_argmax(logits)
    z = logits.float()
    log_p = torch.log_softmax(z, dim=1)
    entropy = -(log_p.exp() * log_p).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).sum(dim=1)
    entropy = torch.where(z.isnan().any(dim=1), float("nan"), entropy)
    return entropy, torch.argmax(z, dim=1)


def pack_mask(mask):
    """Bits of a bool mask (or of [x > 0] for a float one), 8 per byte, little-endian bit order."""
    _meta.check_pack_mask(mask)
    bits = (mask.reshape(-1) > 0) if mask.dtype != torch.bool else mask.reshape(-1)
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = bits.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8) if n else padded


def unpack_mask(packed, numel: int):
    """Inverse of pack_mask: a bool vector of numel entries."""
    _meta.check_unpack_mask(packed, numel)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()
