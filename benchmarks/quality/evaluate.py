"""Accuracy of merged backbones with the frozen task heads on held-out test splits."""
from __future__ import annotations

import torch

from .data import Split, preprocess
from .model import features


@torch.no_grad()
def predictions(model, head, split: Split, image_size: int, batch_size: int, device) -> torch.Tensor:
    model.eval()
    out = []
    for begin in range(0, len(split), batch_size):
        x = preprocess(split.x[begin: begin + batch_size].to(device), image_size)
        out.append(head(features(model, x)).argmax(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def accuracy(model, state: dict, heads: dict, tests: dict[str, Split], image_size: int, batch_size: int,
             device) -> dict[str, float]:
    """task -> accuracy of backbone `state` (loaded into `model`) with that task's head."""
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    result = {}
    for task, split in tests.items():
        pred = predictions(model, heads[task].to(device), split, image_size, batch_size, device)
        result[task] = float((pred == split.y).float().mean())
    return result
