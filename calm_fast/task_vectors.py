"""The task-vectors checkpoint layout of fine-tuned open_clip models, read without pickled code.

    <root>/zeroshot.pt              the pretrained ImageEncoder (root: checkpoints/<ViT-B-32|...>)
    <root>/<Task>/finetuned.pt      one fine-tuned ImageEncoder per task
    <root>/head_<Task>.pt           ClassificationHead per task (optional: zero-shot heads instead)

Each .pt is a torch.save'd module (task_vectors' src/modeling.py). safe_pickle reads them as inert
carriers; here the encoder's `model` (an open_clip CLIP) becomes a state dict under open_clip's own
names ("model.visual.conv1.weight" -> "visual.conv1.weight"), and its module classes say what
open_clip cannot infer from shapes: whether the towers use QuickGELU (the OpenAI weights do).
Every file of a root must be the same model; a mismatch names the file and the first differing key.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import safe_pickle
from .checkpoint import CheckpointError, read_checkpoint

ZEROSHOT_FILE = "zeroshot.pt"
FINETUNED_FILE = "finetuned.pt"
VISUAL_PREFIX = "visual."


def finetuned_path(root: str, task: str) -> str:
    return os.path.join(root, task, FINETUNED_FILE)


def head_path(root: str, task: str) -> str:
    return os.path.join(root, f"head_{task}.pt")


@dataclass
class EncoderCheckpoint:
    """An image encoder file as open_clip state (open_clip key names) plus what its classes say."""

    path: str
    state: dict[str, torch.Tensor]
    quick_gelu: bool | None  # None: a plain state dict, which does not say

    def visual(self) -> dict[str, torch.Tensor]:
        """The image tower's entries: what encode_image uses and what a merge changes."""
        return {k: v for k, v in self.state.items() if k.startswith(VISUAL_PREFIX)}

    @property
    def has_text_tower(self) -> bool:
        return any(k.startswith("transformer.") for k in self.state)


def _clip_of(root, path: str):
    """The open_clip CLIP carrier inside an ImageEncoder / ImageClassifier / CLIP pickle."""
    name = safe_pickle.class_name(root) or ""
    if name.endswith(".ImageEncoder"):
        return _clip_of(root.get("_modules", {}).get("model"), path)
    if name.endswith((".ImageClassifier", ".MultiHeadImageClassifier")):
        return _clip_of(root.get("_modules", {}).get("image_encoder"), path)
    if name.endswith((".CLIP", ".CustomTextCLIP")):
        return root
    raise CheckpointError(f"calm_fast: {path} holds {name or type(root).__name__}, not an ImageEncoder "
                          "wrapping an open_clip model")


def read_encoder(path: str, what: str = "encoder") -> EncoderCheckpoint:
    """A task-vectors ImageEncoder file (or a plain open_clip state dict), without running code."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: {what}: no checkpoint at {path}")
    if path.endswith(".safetensors") or os.path.isdir(path):
        state = read_checkpoint(path, what)
        return EncoderCheckpoint(path, _strip(dict(state.items())), None)
    root = safe_pickle.load(path)
    if isinstance(root, Mapping) and all(isinstance(v, torch.Tensor) for v in root.values()):
        return EncoderCheckpoint(path, _strip(dict(root)), None)  # a plain state dict (weights only)
    if isinstance(root, Mapping) and isinstance(root.get("state_dict"), Mapping):
        return EncoderCheckpoint(path, _strip(dict(root["state_dict"])), None)
    clip = _clip_of(root, path)
    state = safe_pickle.module_state_dict(clip, what=f"{what} ({path})")
    classes = {safe_pickle.class_name(m) for m, _ in safe_pickle.walk_modules(clip)}
    return EncoderCheckpoint(path, state, any(c.endswith(".QuickGELU") for c in classes))


def _strip(state: dict) -> dict:
    """open_clip names from ImageEncoder ("model.") or DataParallel ("module.") state dicts."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_same_model(reference: EncoderCheckpoint, other: EncoderCheckpoint, what: str) -> None:
    """`other` has exactly the image tower of `reference` (keys, shapes, activation)."""
    ref, got = reference.visual(), other.visual()
    hint = f"mixed models in one root? {what}: {other.path} is not the same model as {reference.path}"
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing or extra:
        raise CheckpointError(f"calm_fast: {hint}: it lacks {missing[:3]} and has {extra[:3]}")
    for key, tensor in ref.items():
        if got[key].shape != tensor.shape:
            raise CheckpointError(f"calm_fast: {hint}: {key} is {list(got[key].shape)} there, "
                                  f"{list(tensor.shape)} in {os.path.basename(reference.path)}")
    if None not in (reference.quick_gelu, other.quick_gelu) and reference.quick_gelu != other.quick_gelu:
        raise CheckpointError(f"calm_fast: {hint}: one uses QuickGELU, the other does not")


def check_model_name(model_name: str) -> None:
    from ._open_clip import import_open_clip

    if model_name not in import_open_clip().list_models():
        raise ValueError(f"calm_fast: open_clip has no model {model_name!r} (give the model with --model / "
                         "task_vectors.model; e.g. ViT-B-32, ViT-B-16, ViT-L-14)")


def clip_model(model_name: str, quick_gelu: bool = False, *, text: bool = False) -> torch.nn.Module:
    """The open_clip architecture (no download). Without `text`, the text transformer is dropped,
    as the task-vectors ImageEncoder does: CALM then holds only the image tower's gradients."""
    from ._open_clip import import_open_clip

    open_clip = import_open_clip()
    check_model_name(model_name)
    with _quiet_root_logger():  # "No pretrained weights loaded": intended here, the weights come next
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=bool(quick_gelu))
    if not text and hasattr(model, "transformer"):
        del model.transformer
    return model.eval()


@contextlib.contextmanager
def _quiet_root_logger():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, *,
              prefix: str = VISUAL_PREFIX, kind: str = "open_clip") -> None:
    """Copy the entries under `prefix` into the model; each of the model's own must be given."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing, extra = sorted(set(own) - set(state)), sorted(k for k in state if k.startswith(prefix) and k not in own)
    if missing or extra:
        raise CheckpointError(f"calm_fast: {what} does not fit the {kind} model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, tensor in own.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"calm_fast: {what} does not fit the {kind} model: {key} is "
                                  f"{list(state[key].shape)}, the model's is {list(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


@dataclass
class Layout:
    """A checkpoints/<model> root: its files, checked to exist, and the model they hold."""

    root: str
    model: str
    tasks: list[str]

    @classmethod
    def find(cls, root: str, tasks: Sequence[str], model: str | None = None) -> Layout:
        root = os.path.normpath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"calm_fast: no task-vectors checkpoint folder {root}")
        if not tasks:
            raise ValueError("calm_fast: name the tasks to merge (e.g. --tasks MNIST,EuroSAT)")
        duplicates = sorted({t for t in tasks if list(tasks).count(t) > 1})
        if duplicates:
            raise ValueError(f"calm_fast: duplicate task names {duplicates}")
        if not os.path.exists(os.path.join(root, ZEROSHOT_FILE)):
            raise FileNotFoundError(f"calm_fast: {root} holds no {ZEROSHOT_FILE} (the pretrained encoder)")
        for task in tasks:
            if not os.path.isdir(os.path.join(root, task)):
                present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
                raise FileNotFoundError(f"calm_fast: task {task!r}: no folder {os.path.join(root, task)} "
                                        f"(task folders there: {present})")
            if not os.path.exists(finetuned_path(root, task)):
                raise FileNotFoundError(f"calm_fast: task {task!r}: no {finetuned_path(root, task)}")
        model = model or os.path.basename(os.path.abspath(root))
        check_model_name(model)
        return cls(root, model, list(tasks))

    @property
    def zeroshot(self) -> str:
        return os.path.join(self.root, ZEROSHOT_FILE)

    def finetuned(self, task: str) -> str:
        return finetuned_path(self.root, task)

    def head(self, task: str) -> str:
        return head_path(self.root, task)

    def read(self, progress=None) -> tuple[EncoderCheckpoint, dict[str, EncoderCheckpoint]]:
        """(pretrained, {task: fine-tuned}) encoders, each checked to be the pretrained's model."""
        base = read_encoder(self.zeroshot, "pretrained")
        tuned = {}
        for task in (progress(self.tasks, desc="reading checkpoints") if progress else self.tasks):
            tuned[task] = read_encoder(self.finetuned(task), f"task {task!r}")
            check_same_model(base, tuned[task], f"task {task!r}")
        return base, tuned

    def architecture(self, base: EncoderCheckpoint, *, text: bool = False) -> torch.nn.Module:
        """The open_clip model this root holds, with the pretrained image tower loaded."""
        model = clip_model(self.model, bool(base.quick_gelu), text=text)
        load_into(model, base.state, f"{base.path} (open_clip {self.model})")
        return model

    # ---- what clip_tasks.CLIPTasks asks of a checkpoint form (hf_clip.HFLayout answers the same) ----
    def feature_width(self, base: EncoderCheckpoint) -> int | None:
        """Width of the image features the heads take (None: the checkpoint does not say)."""
        proj = base.state.get("visual.proj")
        return None if proj is None else proj.shape[-1]

    def transform(self, model: torch.nn.Module):
        """PIL image -> the model's input tensor: open_clip's eval transform."""
        from .image_data import eval_transform

        return eval_transform(model)

    def encode(self, model: torch.nn.Module):
        """images -> image features."""
        return model.encode_image

    def load(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
        load_into(model, state, what)

    def read_weights(self, path: str) -> Mapping[str, torch.Tensor]:
        """Weights to evaluate: an encoder .pt (read without pickled code), a merge output, a checkpoint."""
        from .state import load_state_dict

        return read_encoder(path, "weights").state if path.endswith(".pt") else \
            dict(load_state_dict(path, what="weights").items())

    def write_model_files(self, folder: str) -> None:
        """Nothing beside the weights: open_clip needs no config next to them."""

    def text_model(self, base: EncoderCheckpoint, text_tower: str | None):
        """(CLIP with its text tower, the file it came from, tokenizer) for zero-shot heads."""
        from ._open_clip import import_open_clip

        source = read_encoder(text_tower, "text tower") if text_tower else base
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
