"""Loading and validating the weights to merge: pretrained + one fine-tuned copy per task.

Weights may come as an nn.Module, a state dict, or a checkpoint path (.safetensors, or a torch
file read with weights_only=True: a checkpoint never runs code). Parameters are aligned by
name; every mismatch is reported with the task and key it concerns.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def load_state_dict(source, *, what: str = "weights") -> StateDict:
    """A flat name -> tensor dict from a module, a mapping or a checkpoint path."""
    if isinstance(source, torch.nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, (str, os.PathLike)):
        return _load_file(os.fspath(source), what)
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"calm_fast: {what}: entries {bad[:3]} are not tensors")
        return dict(source)
    raise TypeError(f"calm_fast: {what} must be an nn.Module, a state dict or a checkpoint path, "
                    f"got {type(source).__name__}")


def _load_file(path: str, what: str) -> StateDict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: {what}: no checkpoint at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; say so plainly
        raise ValueError(f"calm_fast: {what}: {path} is not a plain tensor checkpoint "
                         f"(torch.load(weights_only=True) refused it: {exc})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return load_state_dict(obj, what=what)


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


def is_mergeable(t: torch.Tensor) -> bool:
    """Float tensors are merged; integer buffers (counters, indices) are carried from pretrained."""
    return t.is_floating_point()


def _check_finite(state: StateDict, what: str) -> None:
    for key, value in state.items():
        if is_mergeable(value) and not bool(torch.isfinite(value).all()):
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
        for key, ref in pretrained.items():
            value = state[key]
            if value.shape != ref.shape:
                raise ValueError(f"calm_fast: {what}: {key} has shape {tuple(value.shape)}, "
                                 f"pretrained has {tuple(ref.shape)}")
            if value.dtype != ref.dtype:
                raise TypeError(f"calm_fast: {what}: {key} has dtype {value.dtype}, "
                                f"pretrained has {ref.dtype}")
        _check_finite(state, what)
    return [k for k, v in pretrained.items() if is_mergeable(v)]
