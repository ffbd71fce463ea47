"""Launch helpers shared by the calm_fast Triton kernels: block sizes, grids, device guard.

Every kernel here is memory-bound and reads each input once, so the only tuning knobs are the
number of elements a program handles (BLOCK) and the warps per program. Offsets are computed in
int64 so that tensors of more than 2**31 elements index correctly.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) a program instance costs about
2 ms whatever its size.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Element-wise kernels (mask_step_, masked_apply_, unpack_mask): elements per program, warps.
BLOCK = 2048
NUM_WARPS = 4

# consensus_merge ("ties", "consensus") keeps the T fp32 inputs of an element in registers
# between its two loops: a thread (NUM_WARPS warps) holds at most ~64 of them, i.e. a block of
# about CONSENSUS_HELD / T elements (sm_90: T=8 -> 1024, ~126 registers, no spills).
CONSENSUS_HELD = 8192

# pack_mask: output bytes per program (8 input elements each, so 4096 inputs per program).
PACK_BLOCK_BYTES = 512

# magnitude_threshold histogram pass: a program histograms one chunk of HIST_BLOCKS_PER_CHUNK
# blocks of HIST_BLOCK elements (16384 scalars, as the CUDA kernel's chunk). Under the
# interpreter, smaller chunks so that the test sizes span several chunks and blocks.
HIST_BLOCK = 4096
HIST_BLOCKS_PER_CHUNK = 4
HIST_WARPS = 8
HIST_INTERPRETER_BLOCK = 1024
HIST_INTERPRETER_BLOCKS_PER_CHUNK = 2

# entropy_argmax: short rows are packed ROWS to a [ROWS, BLOCK_C] tile of ENTROPY_TILE logits
# (larger multi-row tiles cost >100 registers a thread on sm_90); long rows get one program
# each and are walked in chunks of at most ENTROPY_MAX_BLOCK_C columns.
ENTROPY_TILE = 1024
ENTROPY_MAX_BLOCK_C = 4096


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 parses the variable itself
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def grid_1d(numel: int, block: int = BLOCK) -> tuple[int]:
    return (triton.cdiv(numel, block),)


def consensus_block(num_inputs: int, keeps_inputs: bool) -> int:
    """Elements per program of consensus_merge for T inputs (plain sums hold none)."""
    if not keeps_inputs:
        return BLOCK
    fit = 1 << max(0, (CONSENSUS_HELD // max(num_inputs, 1)).bit_length() - 1)  # pow2 floor
    return max(128, min(BLOCK, fit))


def device_guard(t: torch.Tensor):
    """Context for a launch on t: its GPU (Triton launches on the current device, not on the
    tensor's); under the interpreter, numpy's floating-point warnings off (exp overflow,
    0·inf, ... follow IEEE rules there as on a GPU, and are not errors)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if interpreting():
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# The interpreter converts fp32 -> bf16 by truncation (and mishandles some cases): there, store
# bf16 through an explicit round-to-nearest-even on the bits (torch's rule, NaN -> 0x7FC0). On a
# GPU the native conversion is already RNE.
_INTERPRET = tl.constexpr(interpreting())


@triton.jit
def _f32_to_bf16_rne(x):
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_as(ptr, offs, x, mask):
    """Store fp32 x into ptr's element type (round to nearest even)."""
    if _INTERPRET and ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr + offs, _f32_to_bf16_rne(x), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def block_offsets(BLOCK: tl.constexpr):
    """int64 offsets of this program's block in a 1-D launch."""
    return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
