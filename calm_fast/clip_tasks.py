"""The paper's setting in one call: merge and evaluate CLIP checkpoints on image folders.

    tasks = CLIPTasks("checkpoints/ViT-B-32", ["MNIST", "EuroSAT"], data="images/")
    result = tasks.merge(method="calm")            # a MergeResult: tasks.save(result, "merged/")
    tasks.evaluate("merged/")                      # {"MNIST": 0.97, ..., "mean": ...}

Everything CALM needs is derived from the checkpoint layout: the pretrained and fine-tuned image
towers, the architecture, a head per task (a head file, else a zero-shot head from class names
and prompt templates, cached) and each task's images (image_data.py), streamed by index so no
task is loaded whole. Two layouts are read: task_vectors' open_clip .pt files (task_vectors.py:
merged under open_clip's names, "visual.*") and FusionBench's Hugging Face CLIP folders
(hf_clip.py: "vision_model.*"); `find_layout` tells them apart and both answer the same calls.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import heads as heads_mod
from . import methods
from .checkpoint import CheckpointError
from .image_data import ImageFolderTask, ImageForward, Loader, index_pools
from .task_vectors import EncoderCheckpoint, Layout


@dataclass(frozen=True)
class ZeroShot:
    """Class names (in the head's label order) and prompt templates ('a photo of a {}.')."""

    classes: tuple[str, ...]
    templates: tuple[str, ...] = heads_mod.DEFAULT_TEMPLATES

    @classmethod
    def of(cls, value, task: str) -> ZeroShot:
        if isinstance(value, ZeroShot):
            return value
        if isinstance(value, (list, tuple)):
            value = {"classes": value}
        if not isinstance(value, Mapping) or set(value) - {"classes", "templates"} or "classes" not in value:
            raise ValueError(f"calm_fast: task {task!r}: a zero-shot entry is {{classes: [...], templates: "
                             f"[...]}} or a list of class names, got {value!r:.80}")
        spec = cls(tuple(value["classes"] or ()), tuple(value.get("templates") or heads_mod.DEFAULT_TEMPLATES))
        try:
            heads_mod.check_prompts(spec.classes, spec.templates)
        except ValueError as exc:
            raise ValueError(f"calm_fast: task {task!r}: {exc}") from None
        return spec


def default_cache() -> str:
    return os.path.join(os.environ.get("CALM_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "calm_fast")), "heads")


def find_layout(root: str | None, tasks: Sequence[str], model: str | None = None, *, pretrained: str | None = None,
                finetuned: Mapping[str, str] | None = None, text_tower: str | None = None):
    """The checkpoint layout at `root`: FusionBench's Hugging Face folders when `pretrained` or
    `finetuned` is given or root holds a pretrained CLIP folder, else task_vectors' .pt files."""
    from . import hf_clip

    if pretrained is not None or finetuned is not None or (root is not None and hf_clip.is_fusionbench_root(root)):
        if model is not None:
            raise ValueError("calm_fast: model names an open_clip architecture; Hugging Face CLIP folders say "
                             "theirs in config.json (leave --model out)")
        return hf_clip.HFLayout.find(root, tasks, pretrained=pretrained, finetuned=finetuned, text_tower=text_tower)
    if root is None:
        raise ValueError("calm_fast: give the checkpoints root (or pretrained and finetuned folders)")
    return Layout.find(root, tasks, model)


@dataclass
class CLIPTasks:
    """CLIP checkpoints + per-task images: what merge() and evaluation need, built lazily.

    root: a task-vectors checkpoints/<model> folder or a FusionBench root (find_layout).
    data: a folder holding one image folder per task (`<data>/<Task>/`), or task -> a folder or a
    torch Dataset. zeroshot: task -> ZeroShot (or its mapping form), used for tasks without a
    head file. text_tower: the checkpoint with CLIP's text transformer, for zero-shot heads when
    the pretrained one has none (task_vectors drops it). model: the open_clip model name
    (default: the root folder's name). pretrained / finetuned (Hugging Face form): the pretrained
    CLIP folder and task -> CLIPVisionModel folder, instead of <root>/_pretrained_ and <root>/<task>.
    """

    root: str | None
    tasks: Sequence[str]
    data: str | Mapping[str, object] | None = None
    model: str | None = None
    zeroshot: Mapping[str, object] | None = None
    text_tower: str | None = None
    heads_cache: str | None = None
    workers: int | None = None
    batch_size: int = 128
    pretrained: str | None = None
    finetuned: Mapping[str, str] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.tasks = list(self.tasks)
        self.layout = find_layout(self.root, self.tasks, self.model, pretrained=self.pretrained,
                                  finetuned=self.finetuned, text_tower=self.text_tower)
        self.model = self.layout.model
        self.zeroshot = {t: ZeroShot.of(v, t) for t, v in (self.zeroshot or {}).items()}
        unknown = sorted(set(self.zeroshot) - set(self.tasks))
        if unknown:
            raise ValueError(f"calm_fast: zero-shot prompts for unknown task(s) {unknown}; tasks are {self.tasks}")
        if isinstance(self.data, str):
            for task in self.tasks:
                if not os.path.isdir(os.path.join(self.data, task)):
                    raise FileNotFoundError(f"calm_fast: task {task!r}: no image folder "
                                            f"{os.path.join(self.data, task)}")
        elif isinstance(self.data, Mapping):
            missing = sorted(set(self.tasks) - set(self.data))
            if missing:
                raise ValueError(f"calm_fast: no data for task(s) {missing}")

    # ---- checkpoints ---------------------------------------------------------------------------
    def encoders(self, progress=None) -> tuple[EncoderCheckpoint, dict[str, EncoderCheckpoint]]:
        """(pretrained, {task: fine-tuned}) as the layout reads them (hf_clip.HFFolder for folders)."""
        if "encoders" not in self._cache:
            self._cache["encoders"] = self.layout.read(progress)
        return self._cache["encoders"]

    def weights(self, progress=None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(pretrained, {task: fine-tuned}) image towers as merge() takes them."""
        base, tuned = self.encoders(progress)
        return base.visual(), {t: e.visual() for t, e in tuned.items()}

    def architecture(self) -> torch.nn.Module:
        """A fresh model of the image tower (open_clip without its text transformer, or transformers'
        CLIPVisionModelWithProjection) with the pretrained weights."""
        return self.layout.architecture(self.encoders()[0])

    def save(self, result, path: str, **save_kwargs) -> None:
        """result.save(path), plus what the layout's model needs beside the weights (config.json)."""
        result.save(path, **save_kwargs)
        self.layout.write_model_files(path)

    # ---- heads ---------------------------------------------------------------------------------
    def heads(self, device=None, progress=None) -> dict[str, heads_mod.ClassificationHead]:
        if "heads" in self._cache:
            return self._cache["heads"]
        out, text = {}, None
        for task in self.tasks:
            path = self.layout.head(task)
            if path is not None and os.path.exists(path):
                out[task] = heads_mod.read_task_vectors_head(path, f"task {task!r} head")
            elif task in self.zeroshot:
                if text is None:
                    text = self.layout.text_model(self.encoders()[0], self.text_tower)
                spec = self.zeroshot[task]
                key = heads_mod.cache_key(self.model, text[1], spec.classes, spec.templates)
                cache = os.path.join(self.heads_cache or default_cache(), self.model, f"{task}-{key}.safetensors")
                out[task] = heads_mod.cached_head(cache, lambda: heads_mod.zero_shot_head(
                    text[0], text[2], spec.classes, spec.templates, device=device, progress=progress))
                if len(spec.classes) != out[task].num_classes:
                    raise CheckpointError(f"calm_fast: task {task!r}: cached head {cache} does not match its classes")
            else:
                missing = f"{path} does not exist and " if path is not None else ""
                raise FileNotFoundError(f"calm_fast: task {task!r}: no head: {missing}no zero-shot class names are "
                                        "given for it")
            width = self.layout.feature_width(self.encoders()[0])
            if width is not None and out[task].weight.shape[1] != width:
                raise CheckpointError(f"calm_fast: task {task!r}: its head takes {out[task].weight.shape[1]} features, "
                                      f"the {self.model} image tower gives {width}")
        self._cache["heads"] = out
        return out

    # ---- data ----------------------------------------------------------------------------------
    def datasets(self, transform) -> dict[str, torch.utils.data.Dataset]:
        """task -> Dataset; image folders get the model's eval preprocessing and the task's class names."""
        if self.data is None:
            raise ValueError("calm_fast: no data given: CALM and evaluation need images per task (--data)")
        out = {}
        for task in self.tasks:
            given = os.path.join(self.data, task) if isinstance(self.data, str) else self.data[task]
            if isinstance(given, (str, os.PathLike)):
                spec = self.zeroshot.get(task)
                given = ImageFolderTask(os.fspath(given), transform, task=task,
                                        class_names=spec.classes if spec else None)
            elif not hasattr(given, "__getitem__") or not hasattr(given, "__len__"):
                raise TypeError(f"calm_fast: data for task {task!r} must be a folder or a map-style torch "
                                f"Dataset, got {type(given).__name__}")
            out[task] = given
        return out

    def _checked_datasets(self, transform, heads) -> dict:
        datasets = self.datasets(transform)
        for task, dataset in datasets.items():
            if isinstance(dataset, ImageFolderTask):
                dataset.check_head(heads[task].num_classes)
        return datasets

    def calm_inputs(self, device=None, progress=None) -> dict:
        """model / heads / data / forward for merge(method="calm"): pools of indices, images read per batch."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = self.architecture()
        heads = self.heads(device, progress)
        datasets = self._checked_datasets(self.layout.transform(model), heads)
        loader = Loader(None, self.workers)
        return {"model": model, "heads": heads, "data": index_pools(datasets),
                "forward": ImageForward(self.layout.encode(model), datasets, loader, device)}

    # ---- the two things a user does ------------------------------------------------------------
    def merge(self, method: str = "calm", *, config=None, device=None, seed: int = 0, progress: bool = True,
              progress_file=None):
        """calm_fast.merge() over the image towers; CALM also gets heads, images and the model."""
        from .merge import merge, progress_bar

        bar = progress_bar(progress)
        pretrained, finetuned = self.weights(bar)
        extra = self.calm_inputs(device, bar) if methods.get(method).needs_data else {}
        return merge(pretrained, finetuned, method=method, config=config, device=device, seed=seed,
                     progress=progress, progress_file=progress_file, **extra)

    @torch.no_grad()
    def evaluate(self, weights="zeroshot", *, device=None, progress: bool = True) -> dict:
        """Top-1 accuracy per task on labeled image folders, and their mean.

        weights: "zeroshot", "finetuned" (each task's own fine-tuned encoder: the individual
        models), a merge output folder / safetensors file / encoder .pt / Hugging Face folder, or a
        state dict under the layout's names.
        """
        from .merge import progress_bar

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bar = progress_bar(progress)
        model = self.architecture()
        encode = self.layout.encode(model)
        heads = self.heads(device, bar)
        datasets = self._checked_datasets(self.layout.transform(model), heads)
        base, tuned = self.encoders()
        if isinstance(weights, str) and weights not in ("zeroshot", "finetuned"):
            weights = self.layout.read_weights(weights)
        loader = Loader(None, self.workers)
        accuracy = {}
        try:
            for task, dataset in datasets.items():
                unlabeled = isinstance(dataset, ImageFolderTask) and not dataset.labeled
                if unlabeled:
                    raise ValueError(f"calm_fast: task {task!r}: {dataset.root} has no class folders; "
                                     "evaluation needs labeled images (<task>/<class>/*)")
                state = base.state if weights == "zeroshot" else tuned[task].state if weights == "finetuned" else weights
                self.layout.load(model, state, f"the weights evaluated on task {task!r}")
                model.to(device)
                head = heads[task].to(device)
                correct = total = 0
                batches = loader.batches(dataset, self.batch_size)
                n = -(-len(dataset) // self.batch_size)
                for images, labels in (bar(batches, total=n, desc=f"evaluating {task}") if bar else batches):
                    if (labels < 0).any():
                        raise ValueError(f"calm_fast: task {task!r}: evaluation needs labels; the dataset gave -1")
                    predicted = head(encode(images.to(device))).argmax(dim=-1).cpu()
                    correct += int((predicted == labels).sum())
                    total += len(labels)
                accuracy[task] = correct / total
        finally:
            loader.close()
        accuracy["mean"] = sum(accuracy[t] for t in self.tasks) / len(self.tasks)
        return accuracy


def merge_clip(root: str | None, tasks: Sequence[str], data=None, *, method: str = "calm", model: str | None = None,
               zeroshot=None, text_tower=None, heads_cache=None, workers=None, pretrained=None, finetuned=None,
               **merge_kwargs):
    """CLIPTasks(root, tasks, data, ...).merge(method, **merge_kwargs): one call from the layout."""
    return CLIPTasks(root, tasks, data, model=model, zeroshot=zeroshot, text_tower=text_tower,
                     heads_cache=heads_cache, workers=workers, pretrained=pretrained,
                     finetuned=finetuned).merge(method, **merge_kwargs)


def evaluate_clip(weights, root: str | None, tasks: Sequence[str], data, *, model: str | None = None, zeroshot=None,
                  text_tower=None, heads_cache=None, workers=None, batch_size: int = 128, device=None,
                  progress: bool = True, pretrained=None, finetuned=None) -> dict:
    """Per-task accuracy of `weights` with the layout's heads on labeled image folders."""
    return CLIPTasks(root, tasks, data, model=model, zeroshot=zeroshot, text_tower=text_tower,
                     heads_cache=heads_cache, workers=workers, batch_size=batch_size, pretrained=pretrained,
                     finetuned=finetuned).evaluate(weights, device=device, progress=progress)
