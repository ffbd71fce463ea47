"""The k-th largest |x| over every rank's tensors, exactly, by a distributed radix select.

No tensor is gathered: each radix pass, every rank histograms the next byte of the IEEE bit
patterns of its |x| (those matching the bytes chosen so far), one all_reduce sums the [256]
histograms, and every rank picks the same bin from the same sums. fp32 takes 4 passes, bf16 and
fp16 take 2; plus one small all_gather before (k, dtypes, sizes, errors) and one after (tie counts).

Global order, in which tie quotas are filled exactly as ops.magnitude_threshold fills them over
one list: by default rank-major, rank 0's tensors in list order, then rank 1's, and so on, each
tensor in flat order. The result on rank r is then ops.magnitude_threshold over the
concatenation of all ranks' lists, with the tie quotas of rank r's tensors. `order` overrides it,
e.g. for FSDP's dim-0 shards, whose flat elements are a contiguous range of the parameter: with
order[i] = (parameter index, flat offset of this shard), the quotas select the very entries one
process over the unsharded parameters would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import DistributedMergeError, collective, comm_device, gather_checked

CHUNK = 1 << 22  # entries per histogram step: the largest temporaries are a few CHUNK-sized ones
_BITS = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16)}


def _local_summary(tensors, k: int) -> tuple:
    """(k, dtype name or None, number of scalars): what every rank must agree on or add up."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"calm_fast.magnitude_threshold: tensors of several dtypes {sorted(map(str, dtypes))}")
    for i, t in enumerate(tensors):
        if t.dtype not in _BITS:
            raise TypeError(f"calm_fast.magnitude_threshold: tensors[{i}] must be float32, bfloat16 or "
                            f"float16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"calm_fast.magnitude_threshold: tensors[{i}] must be contiguous")
    return k, str(tensors[0].dtype) if tensors else None, sum(t.numel() for t in tensors)


def _histograms(tensors, dtype, prefix: int, high_mask: int, shift: int, device) -> torch.Tensor:
    """[len(tensors), 256] int64: per tensor, how many |x| whose bits equal `prefix` under
    `high_mask` have each value of the byte at `shift`. Chunked: no tensor-sized temporaries."""
    int_dtype, width = _BITS[dtype]
    hist = torch.zeros(len(tensors), 256, dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            # |x| as bits: for non-negative floats, integer order is value order (NaN above inf)
            bits = flat[start:start + CHUNK].view(int_dtype).to(torch.int32) & ((1 << (width - 1)) - 1)
            if high_mask:
                bits = bits[(bits & high_mask) == prefix]
            hist[i] += torch.bincount((bits >> shift) & 255, minlength=256)
    return hist


def magnitude_threshold(tensors, k: int, group=None, *, order=None):
    """(threshold, tie_quota) of ops.magnitude_threshold over all ranks' tensors (module docstring).

    tensors: this rank's list (may be empty), one float dtype across all ranks, contiguous.
    k: the global count to select, equal on every rank, 0 <= k <= total scalars on all ranks.
    order: one sortable key per local tensor, unique across ranks (default: (rank, index)).
    Returns the threshold (0-d, the tensors' dtype, +inf for k = 0), equal on every rank, and
    int64 quotas for this rank's tensors: every |x| > threshold plus the first tie_quota[i]
    entries equal to it in tensor i, over all ranks, are exactly k entries.
    """
    rank = dist.get_rank(group)
    summaries = gather_checked("magnitude_threshold: inputs", lambda: _local_summary(tensors, k), group)
    ks = {r: s[0] for r, s in enumerate(summaries)}
    dtypes = {r: s[1] for r, s in enumerate(summaries) if s[1] is not None}
    if len(set(ks.values())) > 1 or len(set(dtypes.values())) > 1:
        raise DistributedMergeError(f"calm_fast.magnitude_threshold: ranks disagree: k per rank {ks}, "
                                    f"dtype per rank {dtypes}")
    total = sum(s[2] for s in summaries)
    if not 0 <= k <= total:
        raise ValueError(f"calm_fast.magnitude_threshold: k must lie in [0, {total}] (the scalars on all ranks), "
                         f"got {k}")
    dtype = getattr(torch, next(iter(dtypes.values()), "torch.float32").removeprefix("torch."))
    device = tensors[0].device if tensors else comm_device(group)
    quota = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    if k == 0:
        return torch.tensor(float("inf"), dtype=dtype, device=device), quota

    int_dtype, width = _BITS[dtype]
    prefix, remaining = 0, k  # the bits chosen so far; how many of the entries matching them to take
    for shift in range(width - 8, -1, -8):
        high_mask = ((1 << (width - 1)) - 1) & ~((1 << (shift + 8)) - 1)
        per_tensor = _histograms(tensors, dtype, prefix, high_mask, shift, device)
        hist = per_tensor.sum(0).to(comm_device(group))
        collective(f"magnitude_threshold: radix pass at bit {shift}",
                   lambda: dist.all_reduce(hist, group=group), group)
        counts, byte, above = hist.tolist(), 255, 0
        while above + counts[byte] < remaining:  # from the largest byte down
            above += counts[byte]
            byte -= 1
        remaining -= above
        prefix |= byte << shift

    # `remaining` entries equal to the threshold are taken, filled in global order
    ties = per_tensor[:, byte].tolist()
    keys = [(rank, i) for i in range(len(tensors))] if order is None else list(order)
    if len(keys) != len(tensors):
        raise ValueError(f"calm_fast.magnitude_threshold: order has {len(keys)} keys for {len(tensors)} tensors")
    everyone = gather_checked("magnitude_threshold: tie counts", lambda: list(zip(keys, ties)), group)
    if len({key for entries in everyone for key, _ in entries}) != sum(map(len, everyone)):
        raise ValueError("calm_fast.magnitude_threshold: the order keys of all ranks' tensors must be unique")
    mine = dict.fromkeys(keys)
    for key, count in sorted(entry for entries in everyone for entry in entries):
        take = min(remaining, count)
        remaining -= take
        if key in mine:
            mine[key] = take
    quota = torch.tensor([mine[key] for key in keys], dtype=torch.int64, device=device)
    threshold = torch.tensor([prefix], dtype=int_dtype).view(dtype).reshape(()).to(device)
    return threshold, quota
