"""Loading and validating the weights to merge: pretrained + one fine-tuned copy per task.

Weights may come as an nn.Module, a state dict, or a checkpoint path (see checkpoint.py: lazy
safetensors, sharded or not, Hugging Face folders, weights_only torch files). Parameters are
aligned by name; every mismatch is reported with the task and key it concerns.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from .checkpoint import LazyStateDict, read_checkpoint, spec

StateDict = Mapping[str, torch.Tensor]


def load_state_dict(source, *, what: str = "weights") -> StateDict:
    """A flat name -> tensor mapping from a module, a mapping or a checkpoint path (lazy for
    safetensors: tensors are read on access)."""
    if isinstance(source, torch.nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, (str, os.PathLike)):
        return read_checkpoint(os.fspath(source), what)
    if isinstance(source, LazyStateDict):
        return source
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"calm_fast: {what}: entries {bad[:3]} are not tensors")
        return dict(source)
    raise TypeError(f"calm_fast: {what} must be an nn.Module, a state dict or a checkpoint path, "
                    f"got {type(source).__name__}")


def named_tasks(finetuned) -> dict[str, object]:
    """Task name -> weights source, from a mapping or a sequence of (name, source) pairs."""
    if isinstance(finetuned, Mapping):
        pairs = list(finetuned.items())
    elif isinstance(finetuned, Sequence) and all(isinstance(p, tuple) and len(p) == 2 for p in finetuned):
        pairs = list(finetuned)
    else:
        raise TypeError("calm_fast: finetuned must map task names to weights "
                        "(a dict, or a list of (name, weights) pairs)")
    if not pairs:
        raise ValueError("calm_fast: finetuned holds no task")
    names = [name for name, _ in pairs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"calm_fast: duplicate task names {duplicates}")
    return dict(pairs)


def is_mergeable(dtype: torch.dtype) -> bool:
    """Float tensors are merged; integer buffers (counters, indices) are carried from pretrained."""
    return dtype.is_floating_point


def _check_finite(state: StateDict, what: str) -> None:
    """In-memory weights are checked up front; lazy ones as each tensor is first read."""
    if isinstance(state, LazyStateDict):
        return
    for key, value in state.items():
        if is_mergeable(value.dtype) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"calm_fast: {what}: {key} holds NaN or Inf")


def validate(pretrained: StateDict, finetuned: Mapping[str, StateDict]) -> list[str]:
    """Check every task against pretrained by name; return the keys that get merged."""
    _check_finite(pretrained, "pretrained")
    for task, state in finetuned.items():
        what = f"task {task!r}"
        missing = sorted(set(pretrained) - set(state))
        extra = sorted(set(state) - set(pretrained))
        if missing:
            raise KeyError(f"calm_fast: {what} lacks {len(missing)} key(s) of pretrained: {missing[:5]}")
        if extra:
            raise KeyError(f"calm_fast: {what} has {len(extra)} key(s) pretrained lacks: {extra[:5]}")
        for key in pretrained:
            (shape, dtype), (ref_shape, ref_dtype) = spec(state, key), spec(pretrained, key)
            if shape != ref_shape:
                raise ValueError(f"calm_fast: {what}: {key} has shape {tuple(shape)}, "
                                 f"pretrained has {tuple(ref_shape)}")
            if dtype != ref_dtype:
                raise TypeError(f"calm_fast: {what}: {key} has dtype {dtype}, pretrained has {ref_dtype}")
        _check_finite(state, what)
    return [k for k in pretrained if is_mergeable(spec(pretrained, k)[1])]
