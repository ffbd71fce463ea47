"""Triton consensus_merge: one pass over the T task vectors of a parameter, no [T, N] stacking.

The T inputs reach the kernel as a tuple of tensors (Triton >= 3.2); weights and thresholds as
tuples of Python floats (fp32 kernel arguments, the same rounding as torch's scalar cast). The
T loops are unrolled with tl.static_range, so each input is loaded once and held in registers
between the loops that need it twice. Sums run over t = 0..T-1 in fp32 with plain adds, and
FMA contraction is disabled at launch, so sign elections, votes and outputs are bit-identical
to calm_fast.reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calm_fast import _meta

from ._common import NUM_WARPS, block_offsets, consensus_block, device_guard, grid_1d, store_as

_METHODS = {"sum": 0, "ties": 1, "consensus": 2}


@triton.jit
def _consensus_merge_kernel(taus, weights, thresholds, out_ptr, n, min_votes,
                            T: tl.constexpr, METHOD: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    m = offs < n
    weighted = tl.zeros([BLOCK], tl.float32)
    if METHOD == 0:  # weighted sum
        for t in tl.static_range(T):
            tau = tl.load(taus[t] + offs, mask=m, other=0.0).to(tl.float32)
            weighted = weighted + weights[t] * tau
        res = weighted
    elif METHOD == 1:  # TIES: trim, elect the sign of the trimmed sum, mean of the agreeing
        kept = ()
        trimmed = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            tau = tl.load(taus[t] + offs, mask=m, other=0.0).to(tl.float32)
            k = tl.where(tl.abs(tau) >= thresholds[t], tau, 0.0)
            kept = kept + (k,)
            trimmed = trimmed + k
        count = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            k = kept[t]
            # sign(k) == sign(trimmed) and k != 0; a NaN trimmed sum elects nothing.
            agree = ((k > 0.0) & (trimmed > 0.0)) | ((k < 0.0) & (trimmed < 0.0))
            weighted = weighted + tl.where(agree, weights[t] * k, 0.0)
            count = count + agree.to(tl.float32)
        res = tl.where(count > 0.0, tl.div_rn(weighted, tl.maximum(count, 1.0)), 0.0)
    else:  # consensus / TALL: keep where at least min_votes tasks vote for the entry
        vals = ()
        total = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            tau = tl.load(taus[t] + offs, mask=m, other=0.0).to(tl.float32)
            vals = vals + (tau,)
            total = total + tau
        votes = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            tau = vals[t]
            vote = tl.abs(tau) >= thresholds[t] * tl.abs(total - tau)
            votes = votes + vote.to(tl.float32)
            weighted = weighted + weights[t] * tau
        res = tl.where(votes >= min_votes, weighted, 0.0)
    store_as(out_ptr, offs, res, m)


def consensus_merge(task_vectors, weights, thresholds, method: str, min_votes: int):
    """One merged task vector from T task vectors of one parameter (see README, op 3)."""
    _meta.check_consensus_merge(task_vectors, weights, thresholds, method, min_votes)
    first = task_vectors[0]
    out = torch.empty_like(first)
    n = first.numel()
    if n == 0:
        return out
    T = len(task_vectors)
    weights = tuple(float(w) for w in weights)
    # "sum" takes no thresholds; the kernel never reads them then.
    thresholds = tuple(float(x) for x in thresholds) if method != "sum" else (0.0,) * T
    block = consensus_block(T, keeps_inputs=method != "sum")
    with device_guard(first):
        _consensus_merge_kernel[grid_1d(n, block)](
            tuple(task_vectors), weights, thresholds, out, n, float(min_votes),
            T=T, METHOD=_METHODS[method], BLOCK=block, num_warps=NUM_WARPS,
            enable_fp_fusion=False)
    return out

