"""Triton kernels of calm_fast (installed as calm_fast.triton_kernels).

Same public functions and signatures as calm_fast.reference. On CPU tensors they run under the
Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from .consensus_merge import consensus_merge
from .entropy_argmax import entropy_argmax
from .magnitude_threshold import magnitude_threshold
from .mask_ops import mask_grad_sumsq, mask_step_, masked_apply_
from .mask_packing import pack_mask, unpack_mask

__all__ = [
    "mask_step_",
    "mask_grad_sumsq",
    "masked_apply_",
    "consensus_merge",
    "magnitude_threshold",
    "entropy_argmax",
    "pack_mask",
    "unpack_mask",
]
