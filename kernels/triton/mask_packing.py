"""Triton pack_mask / unpack_mask: 8 mask bits per byte, bit i % 8 of byte i // 8."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calm_fast import _meta

from ._common import BLOCK, NUM_WARPS, PACK_BLOCK_BYTES, block_offsets, device_guard, grid_1d


@triton.jit
def _pack_kernel(mask_ptr, out_ptr, n, nbytes, IS_BOOL: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    byte_offs = block_offsets(BLOCK_BYTES)
    bit = tl.arange(0, 8)
    elem = byte_offs[:, None] * 8 + bit[None, :]  # [BLOCK_BYTES, 8], contiguous inputs
    m = elem < n
    if IS_BOOL:  # bool mask read through a uint8 view
        on = tl.load(mask_ptr + elem, mask=m, other=0) != 0
    else:  # float mask: x > 0 (NaN -> 0), compared in fp32
        on = tl.load(mask_ptr + elem, mask=m, other=0.0).to(tl.float32) > 0.0
    packed = tl.sum(on.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte_offs, packed.to(tl.uint8), mask=byte_offs < nbytes)


def pack_mask(mask):
    """Bits of a bool mask (or of [x > 0] for a float one), 8 per byte, little-endian bit order."""
    _meta.check_pack_mask(mask)
    n = mask.numel()
    nbytes = _meta.packed_numel(n)
    out = torch.empty(nbytes, dtype=torch.uint8, device=mask.device)
    if n == 0:
        return out
    is_bool = mask.dtype == torch.bool
    src = mask.reshape(-1)
    if is_bool:
        src = src.view(torch.uint8)
    with device_guard(mask):
        _pack_kernel[grid_1d(nbytes, PACK_BLOCK_BYTES)](
            src, out, n, nbytes, IS_BOOL=is_bool, BLOCK_BYTES=PACK_BLOCK_BYTES,
            num_warps=NUM_WARPS)
    return out


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    m = offs < n
    byte = tl.load(packed_ptr + offs // 8, mask=m, other=0).to(tl.int32)
    bit = (byte >> (offs % 8).to(tl.int32)) & 1
    tl.store(out_ptr + offs, bit.to(tl.uint8), mask=m)


def unpack_mask(packed, numel: int):
    """Inverse of pack_mask: a bool vector of numel entries."""
    _meta.check_unpack_mask(packed, numel)
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    if numel > 0:
        with device_guard(packed):
            _unpack_kernel[grid_1d(numel, BLOCK)](packed, out, numel, BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS)
    return out.view(torch.bool)
