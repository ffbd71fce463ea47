"""Triton magnitude_threshold: radix selection of the k-th largest |x| over a list of tensors.

|x| is taken as its IEEE bit pattern with the sign bit masked off (bit order = value order for
non-negative floats, NaN above +inf), read through an int32 / int16 view of each tensor. Each
pass histograms the next 8 bits from the top (fp32: 4 passes, fp16/bf16: 2) of the entries
whose higher bits equal the prefix chosen so far, one histogram row per tensor; then a
one-program select kernel sums the rows per bin and walks the bins from 255 down exactly as
calm_fast's C++ select_radix_bin does, keeping (prefix, k_remaining) in a small device tensor
that the next pass reads. After the last pass the chosen bin of each row counts that tensor's
entries equal to the threshold, and the select kernel fills the tie quotas greedily in tensor
order. Nothing is read back to the host: the op never waits for the GPU and can be captured
in a CUDA graph.

As in the CUDA kernel, one launch per pass covers the whole list: a small device table holds
each tensor's address and size and, per chunk of the list, the tensor that owns it, so a model
of hundreds of parameters costs 4 histogram launches, not 4 per parameter. No concatenation,
no sort: every pass reads each tensor once.

The table depends on nothing but the list's addresses and sizes and the chunk size, so it is
cached under exactly that key (LRU, per device): a hit is right even where memory was freed
and reused. A miss builds it in pinned memory and copies it with non_blocking=True, since a
copy from pageable memory waits for the stream. A graph captured after one warm-up call replays
with the cached table; each entry keeps its pinned source alive next to the device copy (so a
copy captured into a graph stays valid), and entries used while capturing are never evicted,
since the graph reads them on every replay. A table is copied on the stream of the call that
built it; a call on another stream must be ordered after that one (as its inputs would be).
"""
from __future__ import annotations

from collections import OrderedDict

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
# The select kernel reads the histogram in tiles of this many tensors (rows of 256 bins).
_SELECT_ROWS = 16
TABLE_CACHE_SIZE = 64

# dtype -> (bit-view dtype, its Triton type, magnitude mask, shift of each radix pass from the top)
_LAYOUT = {
    torch.float32: (torch.int32, tl.int32, 0x7FFFFFFF, (24, 16, 8, 0)),
    torch.bfloat16: (torch.int16, tl.int16, 0x7FFF, (8, 0)),
    torch.float16: (torch.int16, tl.int16, 0x7FFF, (8, 0)),
}

# (device, addresses, numels, chunk) -> (device table, its pinned host source, number of chunks)
_TABLES: OrderedDict = OrderedDict()
_GRAPH_TABLES: dict = {}  # the tables CUDA graphs captured: kept for the process's lifetime


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
def _radix_hist_kernel(table_ptr, hist_ptr, state_ptr, num_tensors, hi_mask, shift,
                       BITS: tl.constexpr, SIGN_MASK: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr, BINS: tl.constexpr,
                       RADIX: tl.constexpr):
    """hist[t, d] += #{i in this program's chunk of tensor t : (|x_i| & hi_mask) == prefix and
    digit(|x_i|) == d}, prefix = state[0] as the previous select left it.
    table (int64): address[L], numel[L], first_chunk[L], owner[chunks].
    ALIGNED: every address of the list is a multiple of 16 bytes."""
    chunk = tl.program_id(0)
    t = tl.load(table_ptr + 3 * num_tensors + chunk)
    data = tl.load(table_ptr + t).to(tl.pointer_type(BITS))
    n = tl.load(table_ptr + num_tensors + t)
    start = (chunk - tl.load(table_ptr + 2 * num_tensors + t)) * (BLOCK * BLOCKS_PER_CHUNK)
    prefix = tl.load(state_ptr).to(tl.int32)
    if ALIGNED and start + BLOCK * BLOCKS_PER_CHUNK <= n:
        counts = _chunk_histogram(data, start, n, hi_mask, prefix, shift, SIGN_MASK, True,
                                  BLOCK, BLOCKS_PER_CHUNK, BINS, RADIX)
    else:
        counts = _chunk_histogram(data, start, n, hi_mask, prefix, shift, SIGN_MASK, False,
                                  BLOCK, BLOCKS_PER_CHUNK, BINS, RADIX)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + t * RADIX + bins, counts.to(tl.int64), mask=(bins < RADIX) & (counts > 0))


@triton.jit
def _radix_select_kernel(hist_ptr, state_ptr, threshold_ptr, quota_ptr, num_tensors, shift,
                         LAST: tl.constexpr, ROWS: tl.constexpr, RADIX: tl.constexpr):
    """One program, after each histogram pass: select_radix_bin on the device. The bin b is the
    highest whose count plus the counts above it reaches k_remaining (state[1]); then
    prefix |= b << shift and k_remaining -= the counts above b. After the last pass, b's
    per-tensor counts are the ties: the threshold's bits and the tie quotas are written."""
    bins = tl.arange(0, RADIX)
    totals = tl.zeros([RADIX], tl.int64)
    for t0 in range(0, num_tensors, ROWS):
        rows = t0 + tl.arange(0, ROWS)
        tile = tl.load(hist_ptr + rows[:, None] * RADIX + bins[None, :],
                       mask=(rows < num_tensors)[:, None], other=0)
        totals += tl.sum(tile, axis=0)
    k_rem = tl.load(state_ptr + 1)
    at_or_above = tl.cumsum(totals, axis=0, reverse=True)
    b = tl.max(tl.where(at_or_above >= k_rem, bins, -1), axis=0)
    k_rem -= tl.sum(tl.where(bins == b, at_or_above - totals, 0), axis=0)
    prefix = tl.load(state_ptr) | (b.to(tl.int64) << shift)
    tl.store(state_ptr, prefix)
    tl.store(state_ptr + 1, k_rem)
    if LAST:
        tl.store(threshold_ptr, prefix.to(threshold_ptr.dtype.element_ty))
        taken = tl.full([], 0, tl.int64)  # ties in the tensors before this tile
        for t0 in range(0, num_tensors, ROWS):
            rows = t0 + tl.arange(0, ROWS)
            ties = tl.load(hist_ptr + rows * RADIX + b, mask=rows < num_tensors, other=0)
            before = taken + tl.cumsum(ties, axis=0) - ties
            quota = tl.minimum(tl.maximum(k_rem - before, 0), ties)
            tl.store(quota_ptr + rows, quota, mask=rows < num_tensors)
            taken += tl.sum(ties, axis=0)


def _as_i32(v: int) -> int:
    """A 32-bit pattern as the signed int a Triton i32 argument carries."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _chunk_shape() -> tuple[int, int]:
    if _common.interpreting():
        return _common.HIST_INTERPRETER_BLOCK, _common.HIST_INTERPRETER_BLOCKS_PER_CHUNK
    return _common.HIST_BLOCK, _common.HIST_BLOCKS_PER_CHUNK


def _build_table(addresses, numels, chunk: int, device):
    """The table on the device, from pinned memory on CUDA (a copy that does not wait)."""
    numel = torch.tensor(numels, dtype=torch.int64)
    chunks = (numel + chunk - 1) // chunk  # empty tensors own no chunk
    num_chunks = sum((n + chunk - 1) // chunk for n in numels)
    owner = torch.repeat_interleave(torch.arange(len(numels)), chunks, output_size=num_chunks)
    host = torch.cat([torch.tensor(addresses, dtype=torch.int64), numel, torch.cumsum(chunks, 0) - chunks, owner])
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True), host, num_chunks


def _list_table(views, chunk: int, device) -> tuple[torch.Tensor, int]:
    """The kernel's table for the list (cached, see the module docstring) and its chunk count."""
    key = (device, tuple(v.data_ptr() for v in views), tuple(v.numel() for v in views), chunk)
    entry = _TABLES.pop(key, None) or _GRAPH_TABLES.get(key) or _build_table(*key[1:], device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _GRAPH_TABLES[key] = entry
    _TABLES[key] = entry
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return entry[0], entry[2]


def magnitude_threshold(tensors, k: int):
    """(threshold, tie_quota) as calm_fast.reference.magnitude_threshold defines them: per radix
    pass one histogram launch over the whole list and one select launch, all on the device."""
    _meta.check_magnitude_threshold(tensors, k)
    dtype = tensors[0].dtype
    device = tensors[0].device
    num = len(tensors)
    if k == 0:
        return (torch.full((), float("inf"), dtype=dtype, device=device),
                torch.zeros(num, dtype=torch.int64, device=device))
    bits_dtype, bits_type, sign_mask, shifts = _LAYOUT[dtype]
    views = [t.reshape(-1).view(bits_dtype) for t in tensors]
    block, blocks_per_chunk = _chunk_shape()
    table, num_chunks = _list_table(views, block * blocks_per_chunk, device)
    aligned = all(v.data_ptr() % _VECTOR_BYTES == 0 for v in views)
    hist = torch.empty((num, RADIX_BINS), dtype=torch.int64, device=device)
    state = torch.zeros(2, dtype=torch.int64, device=device)  # (prefix, k_remaining)
    state[1:].fill_(k)
    threshold = torch.empty((), dtype=dtype, device=device)
    quota = torch.empty(num, dtype=torch.int64, device=device)
    hi_mask = 0
    with device_guard(tensors[0]):
        for shift in shifts:
            hist.zero_()
            _radix_hist_kernel[(num_chunks,)](
                table, hist, state, num, _as_i32(hi_mask), shift,
                BITS=bits_type, SIGN_MASK=sign_mask, ALIGNED=aligned, BLOCK=block,
                BLOCKS_PER_CHUNK=blocks_per_chunk, BINS=_HIST_BINS, RADIX=RADIX_BINS,
                num_warps=_common.HIST_WARPS)
            _radix_select_kernel[(1,)](
                hist, state, threshold.view(bits_dtype), quota, num, shift,
                LAST=shift == shifts[-1], ROWS=_SELECT_ROWS, RADIX=RADIX_BINS)
            hi_mask |= (RADIX_BINS - 1) << shift
    return threshold, quota
