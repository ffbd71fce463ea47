"""Triton magnitude_threshold: radix selection of the k-th largest |x| over a list of tensors.

|x| is taken as its IEEE bit pattern with the sign bit masked off (bit order = value order for
non-negative floats, NaN above +inf), read through an int32 / int16 view of each tensor. Each
pass histograms the next 8 bits from the top (fp32: 4 passes, fp16/bf16: 2) of the entries
whose higher bits equal the prefix chosen so far, one histogram row per tensor; the host then
walks the bins from 255 down, summing counts across tensors, exactly as calm_fast's C++
select_radix_bin does. After the last pass the chosen bin of each row counts that tensor's
entries equal to the threshold, and tie quotas are filled greedily in tensor order.

As in the CUDA kernel, one launch per pass covers the whole list: a small device table holds
each tensor's address and size and, per chunk of the list, the tensor that owns it, so a model
of hundreds of parameters costs 4 launches, not 4 per parameter. No concatenation, no sort:
every pass reads each tensor once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calm_fast import _meta

from . import _common
from ._common import device_guard

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
# tl.histogram needs a power-of-two bin count: bins 0..255 hold digits, lanes that are masked
# off or whose prefix does not match go to bin 256 and are never written back.
_HIST_BINS = 2 * RADIX_BINS
_VECTOR_BYTES = 16

# dtype -> (bit-view dtype, its Triton type, magnitude mask, shift of each radix pass from the top)
_LAYOUT = {
    torch.float32: (torch.int32, tl.int32, 0x7FFFFFFF, (24, 16, 8, 0)),
    torch.bfloat16: (torch.int16, tl.int16, 0x7FFF, (8, 0)),
    torch.float16: (torch.int16, tl.int16, 0x7FFF, (8, 0)),
}


@triton.jit
def _chunk_histogram(data, start, n, hi_mask, prefix, shift, SIGN_MASK: tl.constexpr, ALIGNED_FULL: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr, BINS: tl.constexpr,
                     RADIX: tl.constexpr):
    """Digit counts of the chunk's entries whose higher bits equal prefix (bin RADIX: the rest).
    A whole chunk at a 16-byte aligned address loads without bounds masks and says so to the
    compiler (the address comes from the table, so Triton cannot know it): 16-byte loads."""
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], tl.int32)
    for j in tl.static_range(BLOCKS_PER_CHUNK):
        offs = start + j * BLOCK + lanes
        if ALIGNED_FULL:
            ptrs = tl.max_contiguous(tl.multiple_of(data + offs, 16), BLOCK)
            mag = tl.load(ptrs).to(tl.int32) & SIGN_MASK
            hit = (mag & hi_mask) == prefix
        else:
            m = offs < n
            mag = tl.load(data + offs, mask=m, other=0).to(tl.int32) & SIGN_MASK
            hit = m & ((mag & hi_mask) == prefix)
        digit = tl.where(hit, (mag >> shift) & (RADIX - 1), RADIX)
        counts += tl.histogram(digit, BINS)
    return counts


@triton.jit
def _radix_hist_kernel(table_ptr, hist_ptr, num_tensors, hi_mask, prefix, shift,
                       BITS: tl.constexpr, SIGN_MASK: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr, BINS: tl.constexpr,
                       RADIX: tl.constexpr):
    """hist[t, d] += #{i in this program's chunk of tensor t : (|x_i| & hi_mask) == prefix and
    digit(|x_i|) == d}. table (int64): address[L], numel[L], first_chunk[L], owner[chunks].
    ALIGNED: every address of the list is a multiple of 16 bytes."""
    chunk = tl.program_id(0)
    t = tl.load(table_ptr + 3 * num_tensors + chunk)
    data = tl.load(table_ptr + t).to(tl.pointer_type(BITS))
    n = tl.load(table_ptr + num_tensors + t)
    start = (chunk - tl.load(table_ptr + 2 * num_tensors + t)) * (BLOCK * BLOCKS_PER_CHUNK)
    if ALIGNED and start + BLOCK * BLOCKS_PER_CHUNK <= n:
        counts = _chunk_histogram(data, start, n, hi_mask, prefix, shift, SIGN_MASK, True,
                                  BLOCK, BLOCKS_PER_CHUNK, BINS, RADIX)
    else:
        counts = _chunk_histogram(data, start, n, hi_mask, prefix, shift, SIGN_MASK, False,
                                  BLOCK, BLOCKS_PER_CHUNK, BINS, RADIX)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + t * RADIX + bins, counts.to(tl.int64), mask=(bins < RADIX) & (counts > 0))


def _as_i32(v: int) -> int:
    """A 32-bit pattern as the signed int a Triton i32 argument carries."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def select_radix_bin(totals, k_remaining: int):
    """Mirror of calm_fast::select_radix_bin on bin totals (already summed over tensors)."""
    for b in range(RADIX_BINS - 1, -1, -1):
        count = totals[b]
        if count >= k_remaining:
            return b, k_remaining
        k_remaining -= count
    raise RuntimeError("calm_fast.magnitude_threshold: radix selection ran past the last bin")


def _chunk_shape() -> tuple[int, int]:
    if _common.interpreting():
        return _common.HIST_INTERPRETER_BLOCK, _common.HIST_INTERPRETER_BLOCKS_PER_CHUNK
    return _common.HIST_BLOCK, _common.HIST_BLOCKS_PER_CHUNK


def _list_table(views, chunk: int, device) -> tuple[torch.Tensor, int]:
    """The kernel's table for the list (one host-to-device copy) and the number of chunks."""
    numels = torch.tensor([v.numel() for v in views], dtype=torch.int64)
    chunks = (numels + chunk - 1) // chunk  # empty tensors own no chunk
    first_chunk = torch.cumsum(chunks, 0) - chunks
    owner = torch.repeat_interleave(torch.arange(len(views), dtype=torch.int64), chunks)
    addresses = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64)
    table = torch.cat([addresses, numels, first_chunk, owner])
    return table.to(device), int(chunks.sum())


def magnitude_threshold(tensors, k: int):
    """(threshold, tie_quota) as calm_fast.reference.magnitude_threshold defines them: one
    histogram launch per radix pass over the whole list, bins chosen on the host between passes."""
    _meta.check_magnitude_threshold(tensors, k)
    dtype = tensors[0].dtype
    device = tensors[0].device
    num = len(tensors)
    if k == 0:
        return (torch.tensor(float("inf"), dtype=dtype, device=device),
                torch.zeros(num, dtype=torch.int64, device=device))
    bits_dtype, bits_type, sign_mask, shifts = _LAYOUT[dtype]
    views = [t.reshape(-1).view(bits_dtype) for t in tensors]
    block, blocks_per_chunk = _chunk_shape()
    table, num_chunks = _list_table(views, block * blocks_per_chunk, device)
    aligned = all(v.data_ptr() % _VECTOR_BYTES == 0 for v in views)
    hist = torch.empty((num, RADIX_BINS), dtype=torch.int64, device=device)
    prefix, hi_mask, k_rem = 0, 0, int(k)
    with device_guard(tensors[0]):
        for shift in shifts:
            hist.zero_()
            _radix_hist_kernel[(num_chunks,)](
                table, hist, num, _as_i32(hi_mask), _as_i32(prefix), shift,
                BITS=bits_type, SIGN_MASK=sign_mask, ALIGNED=aligned, BLOCK=block,
                BLOCKS_PER_CHUNK=blocks_per_chunk, BINS=_HIST_BINS, RADIX=RADIX_BINS,
                num_warps=_common.HIST_WARPS)
            host = hist.cpu()  # the one sync of the pass
            b, k_rem = select_radix_bin(host.sum(dim=0).tolist(), k_rem)
            prefix |= b << shift
            hi_mask |= (RADIX_BINS - 1) << shift
            in_bin = host[:, b].tolist()
    # After the last pass, in_bin[i] = entries of tensor i equal to the threshold, and k_rem is
    # the number of ties to select (k minus the entries strictly above the threshold).
    quota = []
    for count in in_bin:
        take = min(k_rem, count)
        quota.append(take)
        k_rem -= take
    threshold = torch.tensor([prefix], dtype=bits_dtype).view(dtype).reshape(()).to(device)
    return threshold, torch.tensor(quota, dtype=torch.int64).to(device)
