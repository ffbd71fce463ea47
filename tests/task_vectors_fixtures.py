"""Checkpoints in the task-vectors layout, written by the tests themselves: tiny open_clip towers
pickled as whole modules of classes named like task_vectors' own (src.modeling.ImageEncoder /
ClassificationHead), plus image folders whose classes the heads separate."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (200, 40, 220), (30, 210, 210)]


def open_clip():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    from calm_fast._open_clip import import_open_clip

    return import_open_clip()


def register_tiny(folder: Path, name: str, *, quick_gelu: bool = True, width: int = 64):
    """A tiny CLIP config named `name` (the real BPE tokenizer's vocabulary, so zero-shot prompts
    tokenize as for ViT-B-32)."""
    oc = open_clip()
    config = {"embed_dim": 16, "quick_gelu": quick_gelu,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    configs = folder / f"configs-{name}"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{name}.json").write_text(json.dumps(config))
    oc.add_model_config(str(configs))
    return oc


def _modeling_module():
    """src.modeling with ImageEncoder / ClassificationHead shaped like task_vectors' (src/modeling.py)."""
    module = types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model, train_preprocess, val_preprocess, keep_lang=False):
            super().__init__()
            self.model, self.train_preprocess, self.val_preprocess = model, train_preprocess, val_preprocess
            self.cache_dir = None
            if not keep_lang and hasattr(self.model, "transformer"):
                delattr(self.model, "transformer")

        def forward(self, images):
            return self.model.encode_image(images)

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            output_size, input_size = weights.shape
            super().__init__(input_size, output_size)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

        def forward(self, inputs):
            if self.normalize:
                inputs = inputs / inputs.norm(dim=-1, keepdim=True)
            return super().forward(inputs)

    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__ = "src.modeling"
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    return module


@contextlib.contextmanager
def task_vectors_classes():
    """src.modeling importable while the block runs (to pickle, and to unpickle the unsafe way)."""
    saved = {name: sys.modules.get(name) for name in ("src", "src.modeling")}
    package = types.ModuleType("src")
    package.__path__ = []
    modeling = _modeling_module()
    package.modeling = modeling
    sys.modules["src"], sys.modules["src.modeling"] = package, modeling
    try:
        yield modeling
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def write_images(folder: Path, classes: int, per_class: int, *, seed: int = 0, labeled: bool = True) -> None:
    """Class c: noisy images around colour c (32x32 PNGs); labeled: one subfolder per class."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        target = folder / str(c) if labeled else folder
        target.mkdir(exist_ok=True)
        for i in range(per_class):
            pixels = torch.tensor(COLOURS[c]).view(1, 1, 3) + 40 * torch.randn(32, 32, 3, generator=g)
            Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(target / f"{c}_{i:03d}.png")


def _centroid_head(modeling, encoder, folder: Path, classes: int):
    """A normalized-feature head whose rows are the class means of this encoder's image features."""
    from calm_fast.image_data import ImageFolderTask, eval_transform

    dataset = ImageFolderTask(str(folder), eval_transform(encoder.model))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        features = encoder.model.encode_image(images)
        features = features / features.norm(dim=-1, keepdim=True)
    rows = torch.stack([features[labels == c].mean(0) for c in range(classes)])
    rows = rows - rows.mean(0)
    return modeling.ClassificationHead(True, 30 * rows / rows.norm(dim=-1, keepdim=True), 0.01 * torch.randn(classes))


def write_layout(root: Path, model_name: str, tasks: dict[str, int], images: Path | None = None, *,
                 per_class: int = 6, heads: bool = True, seed: int = 0, keep_lang: bool = False):
    """checkpoints/<model_name>/{zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt} and, with
    `images`, <images>/<Task>/<class>/*.png. tasks: name -> number of classes. Returns the
    fine-tuned modules (for the unsafe comparison)."""
    oc = open_clip()
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    modules = {}
    with task_vectors_classes() as modeling:
        model, train, val = oc.create_model_and_transforms(model_name, pretrained=None)
        zeroshot = modeling.ImageEncoder(model, train, val, keep_lang=keep_lang)
        torch.save(zeroshot, root / "zeroshot.pt")
        modules["zeroshot"] = zeroshot
        for i, (task, classes) in enumerate(tasks.items()):
            g = torch.Generator().manual_seed(seed * 100 + i + 1)
            tuned = modeling.ImageEncoder(oc.create_model(model_name, pretrained=None), train, val, keep_lang=keep_lang)
            tuned.load_state_dict(zeroshot.state_dict())
            with torch.no_grad():
                for p in tuned.model.visual.parameters():
                    p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
            (root / task).mkdir(exist_ok=True)
            torch.save(tuned, root / task / "finetuned.pt")
            modules[task] = tuned
            if images is not None:
                write_images(images / task, classes, per_class, seed=seed * 100 + i)
                if heads:
                    torch.save(_centroid_head(modeling, tuned, images / task, classes), root / f"head_{task}.pt")
    return modules


def unsafe_load(path):
    """torch.load the unsafe way: the tests' reference only, never the library's."""
    with task_vectors_classes():
        return torch.load(path, weights_only=False)
