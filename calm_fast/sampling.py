"""Unlabeled data handling and class-balanced entropy-minimization sampling (CB-EMS).

Batches may be tensors, dicts of tensors, or (inputs, labels) pairs whose labels are ignored:
CALM never sees a true label. A task's data is collected once into one batch-shaped "pool"
(a tensor or a dict of tensors); the pseudo-labelled training set is a subset of its rows.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from . import ops


def _inputs(batch):
    if isinstance(batch, (tuple, list)):  # (inputs, labels): drop the labels
        return batch[0]
    return batch


def collect_pool(data, task: str):
    """All inputs of a task as one tensor (or dict of tensors), rows = examples; only batches from
    an iterable are concatenated (read, never written: the pool is indexed into batches)."""
    if isinstance(data, (torch.Tensor, Mapping)):
        batches = [data]
    elif isinstance(data, Iterable):
        batches = [_inputs(b) for b in data]
    else:
        raise TypeError(f"calm_fast: data for task {task!r} must be a tensor, a dict of tensors or an "
                        f"iterable of batches, got {type(data).__name__}")
    if not batches or pool_size(batches[0]) == 0:
        raise ValueError(f"calm_fast: task {task!r} has no data")
    if len(batches) == 1:  # the caller's tensors as they are: a copy would hold the pool twice
        return dict(batches[0]) if isinstance(batches[0], Mapping) else batches[0]
    if isinstance(batches[0], Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(batches)


def pool_size(pool) -> int:
    if isinstance(pool, Mapping):
        return len(next(iter(pool.values())))
    return len(pool)


def take(pool, index: torch.Tensor, device=None):
    """Rows `index` of a pool, moved to `device`."""
    if isinstance(pool, Mapping):
        return {k: v[index].to(device) for k, v in pool.items()}
    return pool[index].to(device)


def iter_chunks(pool, batch_size: int, device):
    for start in range(0, pool_size(pool), batch_size):
        yield take(pool, torch.arange(start, min(start + batch_size, pool_size(pool))), device)


def select_low_entropy(entropy: torch.Tensor, labels: torch.Tensor, ratio: float,
                       balanced: bool = True) -> torch.Tensor:
    """Indices kept by CB-EMS (per predicted class, the lowest-entropy floor(n_c · ratio)) or,
    with balanced=False, by plain EMS (the globally lowest-entropy floor(n · ratio)).
    Ties in entropy keep the earlier example. Returned in ascending order."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"calm_fast: ratio must lie in (0, 1], got {ratio}")
    entropy, labels = entropy.cpu(), labels.cpu()
    if not balanced:
        keep = int(len(entropy) * ratio)
        return torch.sort(torch.argsort(entropy, stable=True)[:keep]).values
    kept = []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        keep = int(len(members) * ratio)
        order = torch.argsort(entropy[members], stable=True)
        kept.append(members[order[:keep]])
    return torch.sort(torch.cat(kept)).values


@torch.no_grad()
def score(forward, head, pool, batch_size: int, device, progress=None, desc: str = ""):
    """(entropy, argmax) of head(features) over every example of the pool, via the fused op."""
    entropies, labels = [], []
    chunks = iter_chunks(pool, batch_size, device)
    total = -(-pool_size(pool) // batch_size)
    for batch in (progress(chunks, total=total, desc=desc) if progress else chunks):
        logits = head(forward(batch)).float().contiguous()
        h, y = ops.entropy_argmax(logits)
        entropies.append(h.cpu())
        labels.append(y.cpu())
    return torch.cat(entropies), torch.cat(labels)
