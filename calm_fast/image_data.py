"""Images per task, streamed: image folders or any torch Dataset, preprocessed in batches.

A task's data is either a torch Dataset (items: an image tensor, a PIL image, or an
(image, label) pair) or a folder of images: class subfolders (`<task>/<class>/*.jpg`; labels are
used by evaluation only, never by merging) or a flat folder of unlabeled images.

CALM's sampler works on a "pool" of rows it can index. Here a pool holds only example indices
(`{"index": [N], "task": [N]}`), and `ImageForward` loads, preprocesses and encodes the rows a
batch names, so no task's images are ever held in memory whole. Decoding runs on a thread pool
(PIL releases the GIL), overlapping file reads and resizing.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class ImageFolderTask(torch.utils.data.Dataset):
    """One task's images. Items are (image tensor, label); label is -1 for a flat folder.

    Class subfolders map to labels by `class_names` when given (subfolder name = class name),
    else by their integer names (`0/`, `1/`, ...) when all are integers, else in sorted order
    (torchvision's ImageFolder convention).
    """

    def __init__(self, root: str, transform: Callable | None = None, *, class_names: Sequence[str] | None = None,
                 task: str = "task"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"calm_fast: task {task!r}: no image folder {root}")
        self.root, self.transform, self.task = root, transform, task
        entries = sorted(os.listdir(root), key=_natural)
        folders = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
        files = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
        if folders and files:
            raise ValueError(f"calm_fast: task {task!r}: {root} mixes class folders and loose images; use one "
                             "class folder per class, or a flat folder of unlabeled images")
        self.classes: list[str] | None = None
        self.samples: list[tuple[str, int]] = []
        self.label_rule: str | None = None  # "names", "integers" or "sorted"
        self.class_names = list(class_names) if class_names is not None else None
        if folders:
            labels = self._labels(folders, class_names)
            self.classes = folders
            for folder in folders:
                names = sorted((n for n in os.listdir(os.path.join(root, folder)) if _is_image(n)), key=_natural)
                self.samples += [(os.path.join(root, folder, n), labels[folder]) for n in names]
        else:
            self.samples = [(os.path.join(root, n), -1) for n in files]
        if not self.samples:
            raise ValueError(f"calm_fast: task {task!r}: no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) in {root}")

    def _labels(self, folders: list[str], class_names) -> dict[str, int]:
        if class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            unknown = [f for f in folders if f not in index]
            if unknown:
                raise ValueError(f"calm_fast: task {self.task!r}: class folder(s) {unknown[:3]} in {self.root} are "
                                 f"not among its {len(index)} class names")
            self.label_rule = "names"
            return {f: index[f] for f in folders}
        if all(f.isdigit() for f in folders):
            self.label_rule = "integers"
            return {f: int(f) for f in folders}
        self.label_rule = "sorted"
        return {f: i for i, f in enumerate(sorted(folders))}

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def check_head(self, num_classes: int) -> None:
        """The head's class count fits the class folders: equal to the number of class names (or of
        folders, for sorted names); above every folder number, for integer names."""
        if self.classes is None:
            return
        if self.label_rule == "integers":
            top = max(int(f) for f in self.classes)
            if top >= num_classes:
                raise ValueError(f"calm_fast: task {self.task!r}: its head has {num_classes} classes, but {self.root} "
                                 f"has a class folder {top}/")
            return
        have = len(self.class_names) if self.label_rule == "names" else len(self.classes)
        if have != num_classes:
            raise ValueError(f"calm_fast: task {self.task!r}: its head has {num_classes} classes, {self.root} has "
                             f"{have} {'class names' if self.label_rule == 'names' else 'class folders'}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001  (PIL raises many kinds)
            raise ValueError(f"calm_fast: task {self.task!r}: cannot read image {path} ({exc})") from exc
        return (self.transform(image) if self.transform else image), label


def eval_transform(clip_model) -> Callable:
    """open_clip's evaluation preprocessing for this model (resize, center crop, normalize)."""
    from ._open_clip import import_open_clip

    open_clip = import_open_clip()
    cfg = open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip_model))
    return open_clip.transform.image_transform_v2(cfg, is_train=False)


def _image_of(item, transform):
    """(image tensor, label or -1) from a Dataset item."""
    image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
    if not isinstance(image, torch.Tensor):
        if transform is None:
            raise TypeError(f"calm_fast: a dataset item is a {type(image).__name__}, not a tensor, and no "
                            "transform was given")
        image = transform(image)
    return image, int(label) if not isinstance(label, torch.Tensor) else int(label.item())


class Loader:
    """Rows of datasets by index, decoded on a shared thread pool."""

    def __init__(self, transform: Callable | None = None, workers: int | None = None):
        self.transform = transform
        self.workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def rows(self, dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        get = lambda i: _image_of(dataset[int(i)], self.transform)  # noqa: E731
        items = list(self._pool.map(get, indices)) if self._pool else [get(i) for i in indices]
        return torch.stack([im for im, _ in items]), torch.tensor([lb for _, lb in items], dtype=torch.int64)

    def batches(self, dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) over the whole dataset in order; the next batch decodes while this one runs
        (on its own thread: the decoding pool must stay free for the rows of that batch)."""
        ranges = [range(s, min(s + batch_size, len(dataset))) for s in range(0, len(dataset), batch_size)]
        if self._pool is None:
            for indices in ranges:
                yield self.rows(dataset, indices)
            return
        with ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self.rows, dataset, ranges[0]) if ranges else None
            for i in range(len(ranges)):
                current = pending.result()
                pending = ahead.submit(self.rows, dataset, ranges[i + 1]) if i + 1 < len(ranges) else None
                yield current

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def index_pools(datasets: Mapping[str, object]) -> dict[str, dict[str, torch.Tensor]]:
    """task -> CALM data pool of example indices: merge() then samples rows without images."""
    pools = {}
    for i, (task, dataset) in enumerate(datasets.items()):
        n = len(dataset)
        if n == 0:
            raise ValueError(f"calm_fast: task {task!r} has no data")
        pools[task] = {"index": torch.arange(n), "task": torch.full((n,), i, dtype=torch.int64)}
    return pools


class ImageForward:
    """forward(batch) for merge(): loads the rows a pool batch names and encodes them."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], datasets: Mapping[str, object],
                 loader: Loader, device):
        self.encode, self.datasets, self.loader = encode, list(datasets.values()), loader
        self.device = torch.device(device)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        tasks = batch["task"].unique()
        if len(tasks) != 1:
            raise ValueError("calm_fast: a batch mixes examples of several tasks")
        images, _ = self.loader.rows(self.datasets[int(tasks[0])], batch["index"].tolist())
        return self.encode(images.to(self.device))
