"""The paper's setting in one call: merge and evaluate task-vectors CLIP checkpoints on image folders.

    tasks = CLIPTasks("checkpoints/ViT-B-32", ["MNIST", "EuroSAT"], data="images/")
    result = tasks.merge(method="calm")            # a MergeResult: .save("merged/")
    tasks.evaluate("merged/")                      # {"MNIST": 0.97, ..., "mean": ...}

Everything CALM needs is derived from the layout (task_vectors.py): the pretrained and fine-tuned
image towers (merged under open_clip's key names, "visual.*"), the open_clip architecture, a head
per task (head_<Task>.pt, else a zero-shot head from class names and prompt templates, cached),
and each task's images (image_data.py), streamed by index so no task is loaded whole.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import heads as heads_mod
from .checkpoint import CheckpointError
from .image_data import ImageFolderTask, ImageForward, Loader, eval_transform, index_pools
from .task_vectors import VISUAL_PREFIX, EncoderCheckpoint, Layout, clip_model, load_into, read_encoder


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


@dataclass
class CLIPTasks:
    """Task-vectors checkpoints + per-task images: what merge() and evaluation need, built lazily.

    data: a folder holding one image folder per task (`<data>/<Task>/`), or task -> a folder or a
    torch Dataset. zeroshot: task -> ZeroShot (or its mapping form), used for tasks without a
    head_<Task>.pt. text_tower: an open_clip checkpoint with the text transformer, for zero-shot
    heads when zeroshot.pt has none (task_vectors drops it). model: the open_clip model name
    (default: the root folder's name).
    """

    root: str
    tasks: Sequence[str]
    data: str | Mapping[str, object] | None = None
    model: str | None = None
    zeroshot: Mapping[str, object] | None = None
    text_tower: str | None = None
    heads_cache: str | None = None
    workers: int | None = None
    batch_size: int = 128
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.tasks = list(self.tasks)
        self.layout = Layout.find(self.root, self.tasks, self.model)
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
        if "encoders" not in self._cache:
            self._cache["encoders"] = self.layout.read(progress)
        return self._cache["encoders"]

    def weights(self, progress=None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(pretrained, {task: fine-tuned}) image towers as merge() takes them."""
        base, tuned = self.encoders(progress)
        return base.visual(), {t: e.visual() for t, e in tuned.items()}

    def architecture(self) -> torch.nn.Module:
        """A fresh open_clip model (no text transformer) with the pretrained image tower."""
        return self.layout.architecture(self.encoders()[0])

    # ---- heads ---------------------------------------------------------------------------------
    def heads(self, device=None, progress=None) -> dict[str, heads_mod.ClassificationHead]:
        if "heads" in self._cache:
            return self._cache["heads"]
        out, text = {}, None
        for task in self.tasks:
            path = self.layout.head(task)
            if os.path.exists(path):
                out[task] = heads_mod.read_task_vectors_head(path, f"task {task!r} head")
            elif task in self.zeroshot:
                if text is None:
                    text = self._text_model()
                spec = self.zeroshot[task]
                key = heads_mod.cache_key(self.model, text[1], spec.classes, spec.templates)
                cache = os.path.join(self.heads_cache or default_cache(), self.model, f"{task}-{key}.safetensors")
                out[task] = heads_mod.cached_head(cache, lambda: heads_mod.zero_shot_head(
                    text[0], text[2], spec.classes, spec.templates, device=device, progress=progress))
                if len(spec.classes) != out[task].num_classes:
                    raise CheckpointError(f"calm_fast: task {task!r}: cached head {cache} does not match its classes")
            else:
                raise FileNotFoundError(f"calm_fast: task {task!r}: no head: {path} does not exist and no zero-shot "
                                        "class names are given for it")
            width = self.encoders()[0].state.get("visual.proj")
            if width is not None and out[task].weight.shape[1] != width.shape[-1]:
                raise CheckpointError(f"calm_fast: task {task!r}: its head takes {out[task].weight.shape[1]} features, "
                                      f"the {self.model} image tower gives {width.shape[-1]}")
        self._cache["heads"] = out
        return out

    def _text_model(self):
        """(CLIP with its text tower, the file it came from, tokenizer) for zero-shot heads."""
        from ._open_clip import import_open_clip

        base = self.encoders()[0]
        source = read_encoder(self.text_tower, "text tower") if self.text_tower else base
        if not source.has_text_tower:
            raise CheckpointError(f"calm_fast: zero-shot heads need CLIP's text tower, and {source.path} has none "
                                  "(task_vectors' ImageEncoder drops it); give text_tower: an open_clip "
                                  f"{self.model} checkpoint that holds it (--text-tower)")
        model = clip_model(self.model, bool(base.quick_gelu), text=True)
        own = {k: v for k, v in model.state_dict().items() if not k.startswith(VISUAL_PREFIX)}
        missing = sorted(set(own) - set(source.state))
        if missing:
            raise CheckpointError(f"calm_fast: text tower {source.path} lacks {missing[:3]} of open_clip {self.model}")
        with torch.no_grad():
            for key, tensor in own.items():
                if source.state[key].shape != tensor.shape:
                    raise CheckpointError(f"calm_fast: text tower {source.path}: {key} is "
                                          f"{list(source.state[key].shape)}, open_clip {self.model}'s is "
                                          f"{list(tensor.shape)}")
                tensor.copy_(source.state[key])
        return model, source.path, import_open_clip().get_tokenizer(self.model)

    # ---- data ----------------------------------------------------------------------------------
    def datasets(self, transform) -> dict[str, torch.utils.data.Dataset]:
        """task -> Dataset; image folders get open_clip's eval transform and the task's class names."""
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
        datasets = self._checked_datasets(eval_transform(model), heads)
        loader = Loader(None, self.workers)
        return {"model": model, "heads": heads, "data": index_pools(datasets),
                "forward": ImageForward(model.encode_image, datasets, loader, device)}

    # ---- the two things a user does ------------------------------------------------------------
    def merge(self, method: str = "calm", *, config=None, device=None, seed: int = 0, progress: bool = True,
              progress_file=None):
        """calm_fast.merge() over the image towers; CALM also gets heads, images and the model."""
        from .merge import merge, progress_bar

        bar = progress_bar(progress)
        pretrained, finetuned = self.weights(bar)
        extra = self.calm_inputs(device, bar) if method == "calm" else {}
        return merge(pretrained, finetuned, method=method, config=config, device=device, seed=seed,
                     progress=progress, progress_file=progress_file, **extra)

    @torch.no_grad()
    def evaluate(self, weights="zeroshot", *, device=None, progress: bool = True) -> dict:
        """Top-1 accuracy per task on labeled image folders, and their mean.

        weights: "zeroshot", "finetuned" (each task's own fine-tuned encoder: the individual
        models), a merge output folder / safetensors file / encoder .pt, or an open_clip state dict.
        """
        from .merge import progress_bar
        from .state import load_state_dict

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bar = progress_bar(progress)
        model = self.architecture()
        heads = self.heads(device, bar)
        datasets = self._checked_datasets(eval_transform(model), heads)
        base, tuned = self.encoders()
        if isinstance(weights, str) and weights not in ("zeroshot", "finetuned"):
            weights = read_encoder(weights, "weights").state if weights.endswith(".pt") else \
                dict(load_state_dict(weights, what="weights").items())
        loader = Loader(None, self.workers)
        accuracy = {}
        try:
            for task, dataset in datasets.items():
                unlabeled = isinstance(dataset, ImageFolderTask) and not dataset.labeled
                if unlabeled:
                    raise ValueError(f"calm_fast: task {task!r}: {dataset.root} has no class folders; "
                                     "evaluation needs labeled images (<task>/<class>/*)")
                state = base.state if weights == "zeroshot" else tuned[task].state if weights == "finetuned" else weights
                load_into(model, state, f"the weights evaluated on task {task!r}")
                model.to(device)
                head = heads[task].to(device)
                correct = total = 0
                batches = loader.batches(dataset, self.batch_size)
                n = -(-len(dataset) // self.batch_size)
                for images, labels in (bar(batches, total=n, desc=f"evaluating {task}") if bar else batches):
                    if (labels < 0).any():
                        raise ValueError(f"calm_fast: task {task!r}: evaluation needs labels; the dataset gave -1")
                    predicted = head(model.encode_image(images.to(device))).argmax(dim=-1).cpu()
                    correct += int((predicted == labels).sum())
                    total += len(labels)
                accuracy[task] = correct / total
        finally:
            loader.close()
        accuracy["mean"] = sum(accuracy[t] for t in self.tasks) / len(self.tasks)
        return accuracy


def merge_clip(root: str, tasks: Sequence[str], data=None, *, method: str = "calm", model: str | None = None,
               zeroshot=None, text_tower=None, heads_cache=None, workers=None, **merge_kwargs):
    """CLIPTasks(root, tasks, data, ...).merge(method, **merge_kwargs): one call from the layout."""
    return CLIPTasks(root, tasks, data, model=model, zeroshot=zeroshot, text_tower=text_tower,
                     heads_cache=heads_cache, workers=workers).merge(method, **merge_kwargs)


def evaluate_clip(weights, root: str, tasks: Sequence[str], data, *, model: str | None = None, zeroshot=None,
                  text_tower=None, heads_cache=None, workers=None, batch_size: int = 128, device=None,
                  progress: bool = True) -> dict:
    """Per-task accuracy of `weights` with the layout's heads on labeled image folders."""
    return CLIPTasks(root, tasks, data, model=model, zeroshot=zeroshot, text_tower=text_tower,
                     heads_cache=heads_cache, workers=workers, batch_size=batch_size).evaluate(
        weights, device=device, progress=progress)
