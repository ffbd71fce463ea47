"""The FusionBench form: Hugging Face CLIP folders, read with calm_fast's checkpoint machinery.

    <root>/_pretrained_/     the pretrained CLIP (FusionBench's name for it; pretrained/ also works):
                             a save_pretrained CLIPModel folder: config.json, model.safetensors,
                             the tokenizer's files, preprocessor_config.json
    <root>/<task>/           one fine-tuned CLIPVisionModel folder per task (config.json + weights)

What merges is the image tower under the names every FusionBench checkpoint uses and
`CLIPVisionModel.from_pretrained` loads ("vision_model.*"; transformers 5 saves a CLIPVisionModel
without the prefix and both are read). The model CALM runs is transformers'
CLIPVisionModelWithProjection: that tower plus the pretrained CLIP's `visual_projection`
(frozen), so features are projected pooler outputs, as FusionBench's CLIP classifiers compute
them. Heads are CLIP zero-shot heads (heads.zero_shot_head) from the pretrained CLIP's text tower
and tokenizer; a CLIPVisionModel as the pretrained folder needs `text_tower`, a CLIPModel folder
of the same model, for those and for the projection.

Weights are read as state dicts, never by running transformers' loading code: safetensors
lazily (checkpoint.read_checkpoint), pytorch_model.bin (and its shards) through safe_pickle.
transformers itself (the optional `hf` extra) builds the modules, the tokenizer and the image
preprocessing.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import safe_pickle
from ._open_clip import import_transformers
from .checkpoint import (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TORCH_INDEX, TORCH_SINGLE, CheckpointError,
                         LazyStateDict, atomic_file, read_checkpoint)
from .task_vectors import load_into

PRETRAINED_DIRS = ("_pretrained_", "pretrained")
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
TEXT_KEYS = ("text_model.", "text_projection.weight", "logit_scale")
# what makes two CLIP image towers the same architecture (beyond their tensors' shapes)
ARCHITECTURE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "patch_size", "image_size", "num_channels", "hidden_act", "layer_norm_eps")


def is_fusionbench_root(root: str) -> bool:
    """Whether `root` holds a pretrained Hugging Face CLIP folder (_pretrained_/ or pretrained/)."""
    return any(os.path.isfile(os.path.join(root, d, CONFIG_FILE)) for d in PRETRAINED_DIRS)


def read_state(path: str, what: str) -> Mapping[str, torch.Tensor]:
    """A folder's (or file's) weights: safetensors lazily, torch .bin files without pickled code."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: {what}: no checkpoint at {path}")
    if os.path.isdir(path):
        present = [n for n in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TORCH_INDEX, TORCH_SINGLE)
                   if os.path.exists(os.path.join(path, n))]
        if not present:
            raise FileNotFoundError(f"calm_fast: {what}: {path} holds no weights ({SAFETENSORS_SINGLE}, "
                                    f"{SAFETENSORS_INDEX}, {TORCH_SINGLE} or {TORCH_INDEX})")
        path = os.path.join(path, present[0])
    if path.endswith(".bin.index.json"):
        with open(path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        state = {}
        for shard in sorted(set(weight_map.values())):
            part = _pickled_state(os.path.join(os.path.dirname(path), shard), what)
            state.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"calm_fast: {what}: the shards named by {path} lack {missing[:3]}")
        return state
    if path.endswith((".bin", ".pt", ".pth")):
        return _pickled_state(path, what)
    return read_checkpoint(path, what)


def _pickled_state(path: str, what: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: {what}: no shard {path}")
    state = safe_pickle.load(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"calm_fast: {what}: {path} does not hold a name -> tensor mapping")
    return dict(state)


def canonical(state: Mapping[str, torch.Tensor], what: str) -> Mapping[str, torch.Tensor]:
    """The weights under CLIPModel's names: transformers 5's unprefixed CLIPVisionModel keys get
    "vision_model."; position_ids (a buffer older versions saved) are dropped. Stays lazy."""
    keys = list(state)
    if any(k.startswith(VISION_PREFIX) for k in keys):
        names = {k: k for k in keys}
    elif "embeddings.patch_embedding.weight" in keys:
        names = {k: VISION_PREFIX + k for k in keys}
    else:
        raise CheckpointError(f"calm_fast: {what}: no CLIP image tower in it (neither vision_model.* nor "
                              "CLIPVisionModel's embeddings.* keys)")
    names = {old: new for old, new in names.items() if not old.endswith("position_ids")}
    if isinstance(state, LazyStateDict):
        return state.renamed(names)
    return {new: state[old] for old, new in names.items()}


def _select(state: Mapping[str, torch.Tensor], keep) -> Mapping[str, torch.Tensor]:
    names = {k: k for k in state if keep(k)}
    return state.renamed(names) if isinstance(state, LazyStateDict) else {k: state[k] for k in names}


@dataclass
class HFFolder:
    """A save_pretrained CLIP folder: its config.json and its weights under CLIPModel's names."""

    path: str
    config: dict
    state: Mapping[str, torch.Tensor]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def vision_config(self) -> dict:
        return self.config.get("vision_config") or {} if self.model_type == "clip" else self.config

    def visual(self) -> Mapping[str, torch.Tensor]:
        """The image tower's entries: what a merge changes (lazy for safetensors)."""
        return _select(self.state, lambda k: k.startswith(VISION_PREFIX))

    @property
    def has_text_tower(self) -> bool:
        return all(any(k.startswith(p) for k in self.state) for p in TEXT_KEYS)


def read_folder(path: str, what: str) -> HFFolder:
    """A Hugging Face CLIPModel / CLIPVisionModel folder (config.json + weights)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"calm_fast: {what}: no folder {path}")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"calm_fast: {what}: {path} has no {CONFIG_FILE} (a save_pretrained CLIP folder)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"calm_fast: {what}: {config_path} is not JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("model_type") not in ("clip", "clip_vision_model"):
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(f"calm_fast: {what}: {path} is a {kind or 'model of no model_type'}, not a Hugging "
                              "Face CLIPModel or CLIPVisionModel (mixed architectures?)")
    return HFFolder(path, config, canonical(read_state(path, what), f"{what} ({path})"))


def check_same_model(reference: HFFolder, other: HFFolder, what: str) -> None:
    """`other` holds the image tower of `reference`: the same architecture, keys and shapes."""
    hint = f"mixed architectures? {what}: {other.path} is not the same CLIP image tower as {reference.path}"
    ref_cfg, got_cfg = reference.vision_config(), other.vision_config()
    for name in ARCHITECTURE_FIELDS:
        if name in ref_cfg and name in got_cfg and ref_cfg[name] != got_cfg[name]:
            raise CheckpointError(f"calm_fast: {hint}: its {name} is {got_cfg[name]!r}, {ref_cfg[name]!r} there")
    ref, got = reference.visual(), other.visual()
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing or extra:
        raise CheckpointError(f"calm_fast: {hint}: it lacks {missing[:3]} and has {extra[:3]}")
    for key in ref:
        if _shape(got, key) != _shape(ref, key):
            raise CheckpointError(f"calm_fast: {hint}: {key} is {list(_shape(got, key))} there, "
                                  f"{list(_shape(ref, key))} in the pretrained")


def _shape(state: Mapping, key: str) -> torch.Size:
    return state.spec(key)[0] if isinstance(state, LazyStateDict) else state[key].shape


class TextTower(torch.nn.Module):
    """CLIP's text side as heads.zero_shot_head calls it: encode_text(tokens) and logit_scale."""

    def __init__(self, text_model: torch.nn.Module, logit_scale: torch.Tensor):
        super().__init__()
        self.text_model = text_model
        self.register_buffer("logit_scale", logit_scale.detach().clone().float().reshape(()))

    def encode_text(self, tokens) -> torch.Tensor:
        """text_projection(pooled output): transformers' CLIPModel.get_text_features."""
        return self.text_model(**tokens).text_embeds


class Tokenize:
    """texts -> padded, truncated token tensors (a BatchEncoding: .to(device), **-able)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")


class Preprocess:
    """PIL image -> pixel values [3, H, W], with a transformers CLIPImageProcessor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


@dataclass
class HFLayout:
    """The pretrained CLIP folder, a CLIPVisionModel folder per task, and what they hold."""

    root: str | None
    model: str
    tasks: list[str]
    pretrained: str
    folders: dict[str, str]
    text_tower: str | None = None

    @classmethod
    def find(cls, root: str | None, tasks: Sequence[str], *, pretrained: str | None = None,
             finetuned: Mapping[str, str] | None = None, text_tower: str | None = None) -> HFLayout:
        import_transformers()  # the optional dependency, named before any work
        if not tasks:
            raise ValueError("calm_fast: name the tasks to merge (e.g. --tasks sun397,eurosat)")
        duplicates = sorted({t for t in tasks if list(tasks).count(t) > 1})
        if duplicates:
            raise ValueError(f"calm_fast: duplicate task names {duplicates}")
        if root is not None:
            root = os.path.normpath(root)
            if not os.path.isdir(root):
                raise FileNotFoundError(f"calm_fast: no checkpoint folder {root}")
        if pretrained is None:
            found = [os.path.join(root, d) for d in PRETRAINED_DIRS if root is not None and
                     os.path.isfile(os.path.join(root, d, CONFIG_FILE))]
            if not found:
                raise FileNotFoundError(f"calm_fast: no pretrained CLIP folder: {root}/{PRETRAINED_DIRS[0]}/ "
                                        f"(FusionBench's name) or {root}/{PRETRAINED_DIRS[1]}/ with a {CONFIG_FILE}, "
                                        "or give pretrained (--pretrained)")
            pretrained = found[0]
        if not os.path.isfile(os.path.join(pretrained, CONFIG_FILE)):
            raise FileNotFoundError(f"calm_fast: the pretrained CLIP folder {pretrained} has no {CONFIG_FILE}")
        finetuned = dict(finetuned or {})
        unknown = sorted(set(finetuned) - set(tasks))
        if unknown:
            raise ValueError(f"calm_fast: fine-tuned folders for unknown task(s) {unknown}; tasks are {list(tasks)}")
        folders = {}
        for task in tasks:
            if task not in finetuned and root is None:
                raise ValueError(f"calm_fast: task {task!r}: no fine-tuned folder given and no root to find it in")
            folder = finetuned.get(task) or os.path.join(root, task)
            if not os.path.isdir(folder):
                where = os.path.dirname(folder) or "."
                present = sorted(d for d in os.listdir(where) if os.path.isdir(os.path.join(where, d))) \
                    if os.path.isdir(where) else []
                raise FileNotFoundError(f"calm_fast: task {task!r}: no folder {folder} (folders there: {present})")
            if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
                raise FileNotFoundError(f"calm_fast: task {task!r}: {folder} has no {CONFIG_FILE} (a save_pretrained "
                                        "CLIPVisionModel folder)")
            folders[task] = folder
        name = os.path.basename(os.path.abspath(pretrained))
        if name in PRETRAINED_DIRS and root is not None:
            name = os.path.basename(os.path.abspath(root))
        return cls(root, name, list(tasks), pretrained, folders, text_tower)

    # ---- the files -----------------------------------------------------------------------------
    @property
    def zeroshot(self) -> str:
        return self.pretrained

    def finetuned(self, task: str) -> str:
        return self.folders[task]

    def head(self, task: str) -> None:
        """Heads are zero-shot here (FusionBench ships no head files)."""
        return None

    def read(self, progress=None) -> tuple[HFFolder, dict[str, HFFolder]]:
        """(pretrained, {task: fine-tuned}) folders, each checked to hold the pretrained's image tower."""
        base = read_folder(self.pretrained, "pretrained")
        tuned = {}
        for task in (progress(self.tasks, desc="reading checkpoints") if progress else self.tasks):
            tuned[task] = read_folder(self.folders[task], f"task {task!r}")
            check_same_model(base, tuned[task], f"task {task!r}")
        return base, tuned

    def _clip_folder(self, base: HFFolder, need: str) -> HFFolder:
        """The CLIPModel folder that holds the projection and text tower: text_tower, else the pretrained."""
        source = read_folder(self.text_tower, "text tower") if self.text_tower else base
        if PROJECTION not in source.state or not source.has_text_tower:
            raise CheckpointError(f"calm_fast: {need} need CLIP's visual_projection and text tower, and {source.path} "
                                  f"({source.config.get('architectures') or source.model_type}) has none; give "
                                  "text_tower: a CLIPModel folder of the same model (--text-tower)")
        if source is not base:
            check_same_model(base, source, "text tower")
        return source

    # ---- what clip_tasks.CLIPTasks asks of a layout (task_vectors.Layout answers the same) -------
    def architecture(self, base: HFFolder) -> torch.nn.Module:
        """transformers' CLIPVisionModelWithProjection: the pretrained image tower and projection."""
        tf = import_transformers()
        source = self._clip_folder(base, "the image features")
        config = tf.CLIPVisionConfig.from_dict(dict(base.vision_config()))
        config.projection_dim = _shape(source.state, PROJECTION)[0]
        model = tf.CLIPVisionModelWithProjection(config).eval()
        self.load(model, base.state, f"{base.path} (CLIP image tower)")
        load_into(model, source.state, f"{source.path} (visual_projection)", prefix=PROJECTION,
                  kind="CLIPVisionModelWithProjection")
        return model

    def feature_width(self, base: HFFolder) -> int:
        return _shape(self._clip_folder(base, "the image features").state, PROJECTION)[0]

    def transform(self, model: torch.nn.Module) -> Preprocess:
        """transformers' CLIP image preprocessing: preprocessor_config.json of the pretrained (or
        text tower) folder, else CLIP's defaults at the model's image size."""
        tf = import_transformers()
        # transformers 5's CLIPImageProcessor runs on torchvision; its PIL twin where that is missing
        processor = tf.CLIPImageProcessor if importlib.util.find_spec("torchvision") is not None else \
            getattr(tf, "CLIPImageProcessorPil", tf.CLIPImageProcessor)
        for folder in (self.pretrained, self.text_tower):
            if folder and os.path.isfile(os.path.join(folder, PREPROCESSOR_FILE)):
                return Preprocess(processor.from_pretrained(folder))
        size = model.config.image_size
        return Preprocess(processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))

    def encode(self, model: torch.nn.Module):
        """images -> visual_projection(pooler_output)."""
        return lambda images: model(pixel_values=images).image_embeds

    def load(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
        load_into(model, state, what, prefix=VISION_PREFIX, kind="CLIP image tower")

    def read_weights(self, path: str) -> Mapping[str, torch.Tensor]:
        """Weights to evaluate: a merge output, a CLIPVisionModel / CLIPModel folder, a checkpoint file."""
        return canonical(read_state(path, "weights"), f"weights ({path})")

    def write_model_files(self, folder: str) -> None:
        """config.json (a CLIPVisionModel's) and the preprocessor config beside merged weights, so
        that `CLIPVisionModel.from_pretrained(folder)` loads them."""
        base = read_folder(self.pretrained, "pretrained")
        config = {**base.vision_config(), "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"}
        _write_json(os.path.join(folder, CONFIG_FILE), config)
        for source in (self.pretrained, self.text_tower):
            if source and os.path.isfile(os.path.join(source, PREPROCESSOR_FILE)):
                with open(os.path.join(source, PREPROCESSOR_FILE)) as f:
                    _write_json(os.path.join(folder, PREPROCESSOR_FILE), json.load(f))
                break

    def text_model(self, base: HFFolder, text_tower: str | None = None):
        """(TextTower, the weights it came from, tokenizer) for heads.zero_shot_head."""
        tf = import_transformers()
        source = self._clip_folder(base, "zero-shot heads")
        config = tf.CLIPTextConfig.from_dict(dict(source.config.get("text_config") or {}))
        config.projection_dim = _shape(source.state, "text_projection.weight")[0]
        text = tf.CLIPTextModelWithProjection(config).eval()
        load_into(text, source.state, f"{source.path} (CLIP text tower)", prefix="text_",
                  kind="CLIPTextModelWithProjection")
        try:
            tokenizer = tf.CLIPTokenizer.from_pretrained(source.path)
        except Exception as exc:  # noqa: BLE001  (OSError, ValueError, TypeError: no or broken tokenizer files)
            raise CheckpointError(f"calm_fast: zero-shot heads need CLIP's tokenizer, and {source.path} has no "
                                  f"readable one (vocab.json + merges.txt, or tokenizer.json): {exc}") from exc
        weights = next((os.path.join(source.path, n) for n in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, TORCH_SINGLE,
                                                               TORCH_INDEX)
                        if os.path.exists(os.path.join(source.path, n))), source.path)
        tower = TextTower(text, source.state["logit_scale"])
        return tower, weights, Tokenize(tokenizer, config.max_position_embeddings)


def _write_json(path: str, value: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)

    atomic_file(path, write)
