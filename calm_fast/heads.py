"""Classification heads for CLIP image features: from task-vectors head files, or zero-shot.

CALM needs one frozen head per task (features -> logits). The task-vectors layout ships them as
pickled `ClassificationHead` modules (an nn.Linear with a `normalize` flag); a task without one
gets the standard CLIP zero-shot head, built from the text tower: for each class, the mean of
the L2-normalized embeddings of its prompts, normalized again and scaled by exp(logit_scale).
Zero-shot heads are cached as safetensors, keyed by everything they depend on.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import torch

from .checkpoint import CheckpointError, atomic_file

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ClassificationHead(torch.nn.Module):
    """logits = W · (x / ‖x‖ if normalize else x) + b. Weights are buffers: always frozen."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"calm_fast: a head's weight must be [classes, features], got {tuple(weight.shape)}")
        self.normalize = bool(normalize)
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", torch.zeros(weight.shape[0]) if bias is None else bias.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return torch.nn.functional.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, features={self.weight.shape[1]}, normalize={self.normalize}"


def read_task_vectors_head(path: str, what: str = "head") -> ClassificationHead:
    """A task-vectors `head_<Task>.pt` (a pickled ClassificationHead), read without running it."""
    from . import safe_pickle

    root = safe_pickle.load(path)
    name = safe_pickle.class_name(root)
    if name is None or not name.endswith(".ClassificationHead"):
        raise CheckpointError(f"calm_fast: {what}: {path} holds {name or type(root).__name__}, "
                              "not a ClassificationHead")
    params = safe_pickle.module_state_dict(root, what=f"{what} ({path})")
    if "weight" not in params:
        raise CheckpointError(f"calm_fast: {what}: {path} has no weight")
    return ClassificationHead(params["weight"], params.get("bias"), bool(root.get("normalize", False)))


@torch.no_grad()
def zero_shot_head(clip_model, tokenizer: Callable, classnames: Sequence[str],
                   templates: Sequence[str] = DEFAULT_TEMPLATES, *, device=None, progress=None) -> ClassificationHead:
    """The standard CLIP zero-shot head: per class, mean of the normalized text embeddings of
    `template.format(classname)` for every template, normalized, times exp(logit_scale)."""
    check_prompts(classnames, templates)
    device = torch.device(device or "cpu")
    clip_model = clip_model.to(device)
    rows = []
    names = list(classnames)
    for name in (progress(names, desc="zero-shot head") if progress else names):
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        embeddings = clip_model.encode_text(tokens).float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    weight = torch.stack(rows) * clip_model.logit_scale.exp().float()
    return ClassificationHead(weight.cpu(), None, normalize=True)


def check_prompts(classnames, templates) -> None:
    if isinstance(classnames, str) or not classnames or not all(isinstance(c, str) and c for c in classnames):
        raise ValueError(f"calm_fast: zero-shot class names must be a non-empty list of strings, got {classnames!r:.80}")
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError("calm_fast: zero-shot templates must be a non-empty list of strings with a '{}' "
                         f"for the class name, got {templates!r:.80}")


def cache_key(model_name: str, text_source: str, classnames, templates) -> str:
    """What a zero-shot head depends on: model, text weights (path, size, mtime), prompts."""
    stat = os.stat(text_source) if os.path.exists(text_source) else None
    payload = {"model": model_name, "text": os.path.abspath(text_source),
               "text_file": [stat.st_size, stat.st_mtime_ns] if stat else None,
               "classes": list(classnames), "templates": list(templates)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cached_head(path: str, build: Callable[[], ClassificationHead]) -> ClassificationHead:
    """The head saved at `path` (safetensors), else build() it and save it there (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if os.path.exists(path):
        try:
            with safe_open(path, framework="pt") as f:
                normalize = f.metadata().get("normalize") == "true"
                return ClassificationHead(f.get_tensor("weight"), f.get_tensor("bias"), normalize)
        except Exception:  # noqa: BLE001  (a damaged cache entry is rebuilt)
            pass
    head = build()
    atomic_file(path, lambda tmp: save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()},
                                            tmp, metadata={"normalize": str(head.normalize).lower()}))
    return head
