"""calm_fast: CALM model merging with fused CPU / CUDA / Triton kernels."""
from . import ops, reference
from ._extension import NATIVE, NATIVE_CUDA

__version__ = "0.1.0"
__all__ = ["ops", "reference", "NATIVE", "NATIVE_CUDA", "__version__"]
