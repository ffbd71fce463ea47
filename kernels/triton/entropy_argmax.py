"""Triton entropy_argmax: per row of [B, C] logits, softmax entropy (fp32) and first argmax.

Each program owns ROWS rows and walks their columns in chunks of BLOCK_C, keeping per row an
online max m, s = sum exp(z - m) and t = sum exp(z - m)·(z - m), rescaled when m grows; then
entropy = log(s) - t/s. As in calm_fast.reference: -inf logits contribute nothing, a row whose
max is +inf or that is all -inf has entropy 0 (the reference's nan_to_num), a row holding a NaN
has entropy NaN and argmax = its first NaN (torch.argmax), otherwise argmax = first max.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calm_fast import _meta

from ._common import ENTROPY_MAX_BLOCK_C, ENTROPY_TILE, device_guard, next_pow2


@triton.jit
def _entropy_argmax_kernel(x_ptr, ent_ptr, idx_ptr, B, C,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_ptr = x_ptr + rows.to(tl.int64) * C
    lanes = tl.arange(0, BLOCK_C)
    NEG_INF: tl.constexpr = float("-inf")
    POS_INF: tl.constexpr = float("inf")
    m = tl.full([ROWS], NEG_INF, tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    best = tl.full([ROWS], NEG_INF, tl.float32)
    best_idx = tl.zeros([ROWS], tl.int32)
    nan_idx = tl.full([ROWS], C, tl.int32)  # C: no NaN seen
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + lanes
        msk = row_ok[:, None] & (cols < C)[None, :]
        z = tl.load(row_ptr[:, None] + cols[None, :], mask=msk, other=NEG_INF).to(tl.float32)
        is_nan = z != z
        nan_idx = tl.minimum(nan_idx, tl.min(tl.where(is_nan, cols[None, :], C), axis=1))
        z = tl.where(is_nan, NEG_INF, z)
        cmax = tl.max(z, axis=1)
        # first column holding the chunk max (all -inf: the chunk's first column)
        cidx = tl.min(tl.where(z == cmax[:, None], cols[None, :], C), axis=1)
        better = cmax > best  # strict: an earlier chunk keeps ties
        best_idx = tl.where(better, cidx, best_idx)
        best = tl.where(better, cmax, best)
        # online softmax; rows whose max is not finite are overwritten at the end
        m_new = tl.maximum(m, cmax)
        finite = (m_new > NEG_INF) & (m_new < POS_INF)
        m_ref = tl.where(finite, m_new, 0.0)
        seen = m > NEG_INF
        alpha = tl.where(seen, tl.exp(m - m_ref), 0.0)
        dm = tl.where(seen, m - m_ref, 0.0)
        d = z - m_ref[:, None]
        e = tl.exp(d)
        ed = e * tl.where(e > 0.0, d, 0.0)  # exp underflow / -inf logits: 0·(-inf) -> 0
        t = alpha * (t + s * dm) + tl.sum(ed, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    finite = (m > NEG_INF) & (m < POS_INF)
    s = tl.where(finite, s, 1.0)  # +inf max or all -inf: 0, as the reference's nan_to_num
    ent = tl.where(finite, tl.log(s) - t / s, 0.0)
    has_nan = nan_idx < C
    ent = tl.where(has_nan, float("nan"), ent)
    idx = tl.where(has_nan, nan_idx, best_idx)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    tl.store(idx_ptr + rows, idx.to(tl.int64), mask=row_ok)


def _tile(C: int) -> tuple[int, int, int]:
    block_c = min(next_pow2(C), ENTROPY_MAX_BLOCK_C)
    rows = max(1, ENTROPY_TILE // block_c)
    num_warps = 4 if rows * block_c <= 1024 else 8
    return rows, block_c, num_warps


def entropy_argmax(logits):
    """Per row of [B, C] logits: softmax entropy (fp32) and the first index of the max (int64)."""
    _meta.check_entropy_argmax(logits)
    B, C = logits.shape
    entropy = torch.empty(B, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return entropy, argmax
    rows, block_c, num_warps = _tile(C)
    rows = min(rows, next_pow2(B))
    with device_guard(logits):
        _entropy_argmax_kernel[(triton.cdiv(B, rows),)](
            logits, entropy, argmax, B, C, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps)
    return entropy, argmax
