"""Triton magnitude_threshold: radix selection of the k-th largest |x| over a list of tensors.

|x| is taken as its IEEE bit pattern with the sign bit masked off (bit order = value order for
non-negative floats, NaN above +inf), read through an int32 / int16 view of each tensor. Each
pass histograms the next 8 bits from the top (fp32: 4 passes, fp16/bf16: 2) of the entries
whose higher bits equal the prefix chosen so far, one histogram row per tensor; the host then
walks the bins from 255 down, summing counts across tensors, exactly as calm_fast's C++
select_radix_bin does. After the last pass the chosen bin of each row counts that tensor's
entries equal to the threshold, and tie quotas are filled greedily in tensor order.
No concatenation, no sort: every pass reads each tensor once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calm_fast import _meta

from ._common import HIST_BLOCK, HIST_WARPS, device_guard, persistent_grid

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
# tl.histogram needs a power-of-two bin count: bins 0..255 hold digits, lanes that are masked
# off or whose prefix does not match go to bin 256 and are never written back.
_HIST_BINS = 2 * RADIX_BINS

# dtype -> (bit-view dtype, magnitude mask, shift of each radix pass from the top)
_LAYOUT = {
    torch.float32: (torch.int32, 0x7FFFFFFF, (24, 16, 8, 0)),
    torch.bfloat16: (torch.int16, 0x7FFF, (8, 0)),
    torch.float16: (torch.int16, 0x7FFF, (8, 0)),
}


@triton.jit
def _radix_hist_kernel(bits_ptr, hist_ptr, n, hi_mask, prefix, shift, SIGN_MASK: tl.constexpr,
                       BLOCK: tl.constexpr, BINS: tl.constexpr, RADIX: tl.constexpr):
    """hist[d] += #{i : (|x_i| & hi_mask) == prefix and digit(|x_i|) == d}, grid-stride."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], tl.int32)
    start = pid.to(tl.int64) * BLOCK
    step = nprog.to(tl.int64) * BLOCK
    for _ in range(pid, tl.cdiv(n, BLOCK), nprog):
        offs = start + lanes
        m = offs < n
        mag = tl.load(bits_ptr + offs, mask=m, other=0).to(tl.int32) & SIGN_MASK
        hit = m & ((mag & hi_mask) == prefix)
        digit = tl.where(hit, (mag >> shift) & (RADIX - 1), RADIX)
        counts += tl.histogram(digit, BINS)
        start += step
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, counts.to(tl.int64), mask=(bins < RADIX) & (counts > 0))


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


def magnitude_threshold(tensors, k: int):
    """(threshold, tie_quota) as calm_fast.reference.magnitude_threshold defines them: one
    histogram launch per tensor and radix pass, bins chosen on the host between passes."""
    _meta.check_magnitude_threshold(tensors, k)
    dtype = tensors[0].dtype
    device = tensors[0].device
    num = len(tensors)
    if k == 0:
        return (torch.tensor(float("inf"), dtype=dtype, device=device),
                torch.zeros(num, dtype=torch.int64, device=device))
    bits_dtype, sign_mask, shifts = _LAYOUT[dtype]
    views = [t.reshape(-1).view(bits_dtype) for t in tensors]
    hist = torch.empty((num, RADIX_BINS), dtype=torch.int64, device=device)
    # Tensors that still hold entries matching the prefix (all non-empty ones before pass 1).
    live = [i for i, v in enumerate(views) if v.numel() > 0]
    prefix, hi_mask, k_rem = 0, 0, int(k)
    with device_guard(tensors[0]):
        for shift in shifts:
            hist.zero_()
            for i in live:
                n = views[i].numel()
                _radix_hist_kernel[persistent_grid(n, HIST_BLOCK, device)](
                    views[i], hist[i], n, _as_i32(hi_mask), _as_i32(prefix), shift,
                    SIGN_MASK=sign_mask, BLOCK=HIST_BLOCK, BINS=_HIST_BINS, RADIX=RADIX_BINS,
                    num_warps=HIST_WARPS)
            host = hist.cpu()  # the one sync of the pass
            b, k_rem = select_radix_bin(host.sum(dim=0).tolist(), k_rem)
            prefix |= b << shift
            hi_mask |= (RADIX_BINS - 1) << shift
            in_bin = host[:, b].tolist()
            live = [i for i in live if in_bin[i] > 0]
    # After the last pass, in_bin[i] = entries of tensor i equal to the threshold, and k_rem is
    # the number of ties to select (k minus the entries strictly above the threshold).
    quota = []
    for count in in_bin:
        take = min(k_rem, count)
        quota.append(take)
        k_rem -= take
    threshold = torch.tensor([prefix], dtype=bits_dtype).view(dtype).reshape(()).to(device)
    return threshold, torch.tensor(quota, dtype=torch.int64).to(device)
