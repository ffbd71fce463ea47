"""The calm_fast ops, dispatched to a backend.

Backends:
- "native": the compiled kernels behind torch.ops.calm_fast.* (C++/OpenMP on CPU, CUDA on GPU).
- "triton": the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
- "reference": plain torch, the oracle the tests compare against.
- "auto" (default): native when it is built for the tensors' device, else Triton on CUDA,
  else the reference.
Choose per call (`backend=`), for a block (`with calm_fast.ops.use_backend("triton"):`), or
process-wide with the CALM_FAST_BACKEND environment variable.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from . import _extension, _meta, _source_tree, reference

BACKENDS = ("auto", "native", "triton", "reference")
_state = {"backend": os.environ.get("CALM_FAST_BACKEND", "auto")}


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"calm_fast: backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this block on `name` (one of BACKENDS)."""
    previous = _state["backend"]
    _state["backend"] = _check_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def _triton_module():
    """calm_fast.triton_kernels, imported lazily (triton is optional), installed or from the tree."""
    return _source_tree.import_subpackage("triton_kernels")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The concrete backend ("native", "triton" or "reference") an op on `device` runs on."""
    name = _check_backend(backend or _state["backend"])
    if name != "auto":
        if name == "native" and not _extension.NATIVE:
            raise RuntimeError(f"calm_fast: the native extension is not built ({_extension.LOAD_ERROR})")
        return name
    if device.type == "cuda":
        if _extension.NATIVE_CUDA:
            return "native"
        return "triton"
    if device.type == "cpu" and _extension.NATIVE:
        return "native"
    _warn_reference_fallback(device.type)
    return "reference"


@functools.lru_cache(maxsize=None)
def _warn_reference_fallback(device_type: str) -> None:
    warnings.warn(f"calm_fast: no native kernels for {device_type}; using the plain-torch reference")


def _dispatch(name: str, device: torch.device, backend: str | None):
    chosen = resolve_backend(device, backend)
    if chosen == "native":
        return _extension.native_op(name)
    if chosen == "triton":
        return getattr(_triton_module(), name)
    return getattr(reference, name)


def mask_step_(logits, weight, grad, delta, base=None, *, lr: float, l1: float = 1.0,
               reg: str = "polarize", backend: str | None = None) -> None:
    """CALM's fused mask update, in place on `logits` and `weight` (see README, op 1)."""
    _dispatch("mask_step_", logits.device, backend)(logits, weight, grad, delta, base, lr, l1, reg)


def mask_grad_sumsq(logits, grad, delta, *, backend: str | None = None) -> torch.Tensor:
    """Σ (g·δ·σ'(S))², a 0-d fp32 tensor on the inputs' device (no host sync)."""
    return _dispatch("mask_grad_sumsq", logits.device, backend)(logits, grad, delta)


def masked_apply_(weight, delta, mask, mode: str = "hard", *, backend: str | None = None) -> None:
    """weight += m ⊙ delta in place, m from soft/hard mask logits or a packed mask."""
    _dispatch("masked_apply_", weight.device, backend)(weight, delta, mask, mode)


def masked_apply(base, delta, mask, mode: str = "hard", *, backend: str | None = None):
    """base + m ⊙ delta as a new tensor."""
    out = base.clone(memory_format=torch.contiguous_format)
    masked_apply_(out, delta, mask, mode, backend=backend)
    return out


def consensus_merge(task_vectors, weights, thresholds=(), method: str = "sum", min_votes: int = 0,
                    *, backend: str | None = None):
    """Merge T task vectors of one parameter in one pass (sum / ties / consensus)."""
    if not len(task_vectors):  # the dispatcher needs a tensor to pick a kernel: fail here
        _meta.check_consensus_merge(task_vectors, weights, thresholds, method, min_votes)
    return _dispatch("consensus_merge", task_vectors[0].device, backend)(
        list(task_vectors), [float(w) for w in weights], [float(t) for t in thresholds],
        method, int(min_votes))


def magnitude_threshold(tensors, k: int, *, backend: str | None = None):
    """(k-th largest |x| over all tensors, per-tensor tie quotas) for exactly-k selection."""
    if not len(tensors):
        _meta.check_magnitude_threshold(tensors, k)
    return _dispatch("magnitude_threshold", tensors[0].device, backend)(list(tensors), int(k))


def entropy_argmax(logits, *, backend: str | None = None):
    """Softmax entropy (fp32) and argmax (int64) of each row of [B, C] logits."""
    return _dispatch("entropy_argmax", logits.device, backend)(logits)


def pack_mask(mask, *, backend: str | None = None):
    """Mask bits, 8 per byte (bit i % 8 of byte i // 8), from a bool or float (x > 0) tensor."""
    return _dispatch("pack_mask", mask.device, backend)(mask)


def unpack_mask(packed, numel: int, *, backend: str | None = None):
    """The bool vector of `numel` entries that pack_mask packed."""
    return _dispatch("unpack_mask", packed.device, backend)(packed, int(numel))
