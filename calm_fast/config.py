"""The merge config file (YAML) of `calm-fast merge`: parsed and validated before any work.

    method: calm                 # calm | task_arithmetic | ties | consensus | average
    pretrained: base.safetensors # a checkpoint path (file, shard index, Hugging Face folder)
                                 # or {open_clip: ViT-B-32, checkpoint: path}
    finetuned:                   # task name -> the same kinds
      mnist: mnist.safetensors
    options: {updates: 50}       # CALMConfig fields (calm) or DataFreeConfig fields (the others)
    factory: factory.py:build    # calm: fn(**factory_args) -> {heads, data[, model, forward]}
    factory_args: {}
    output: merged/              # a folder: (sharded) safetensors, masks.safetensors, report.json
    device: auto                 # auto | cpu | cuda | cuda:N
    seed: 0
    shard_size: 5GB
    resume: true                 # calm: continue from <output>.progress.safetensors if present
    overwrite: false

The paper's setting replaces pretrained / finetuned / factory with one block (clip_tasks.py):

    task_vectors:
      root: checkpoints/ViT-B-32 # zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt
      tasks: [MNIST, EuroSAT]
      data: images/              # <data>/<Task>/ image folders (CALM and evaluation)
      model: ViT-B-32            # open_clip model name; default: the root folder's name
      zeroshot: prompts.yaml     # or task -> {classes: [...], templates: [...]}: heads for tasks
                                 # without head_<Task>.pt
      text_tower: clip.bin       # open_clip checkpoint with the text tower (zero-shot heads)
      heads_cache: heads/        # zero-shot heads, as safetensors (default ~/.cache/calm_fast/heads)
      workers: 4                 # image decoding threads
      batch_size: 128            # evaluation batch size

or, for FusionBench's Hugging Face CLIP folders (hf_clip.py; needs the `hf` extra), the same block
with root holding _pretrained_/ (a CLIPModel folder) and one CLIPVisionModel folder per task, or
naming them itself:

      pretrained: clip-vit-base-patch32/          # default: <root>/_pretrained_ or <root>/pretrained
      finetuned: {sun397: clip-vit-base-patch32_sun397/, ...}   # default: <root>/<task>
      text_tower: clip-vit-base-patch32/          # a CLIPModel folder, when pretrained is a CLIPVisionModel

Relative paths (checkpoints, factory file, output) are relative to the config file's folder.
Every error names the field and what it accepts.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import typing
from dataclasses import dataclass, field

import torch

from . import methods
from .baselines import DataFreeConfig
from .calm import CALMConfig
from .checkpoint import DEFAULT_MAX_SHARD_BYTES, parse_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIELDS = ("method", "pretrained", "finetuned", "options", "factory", "factory_args", "output", "device",
          "seed", "shard_size", "resume", "overwrite", "task_vectors")
TASK_VECTORS_FIELDS = ("root", "tasks", "data", "model", "zeroshot", "text_tower", "heads_cache", "workers",
                       "batch_size", "pretrained", "finetuned")


class ConfigError(ValueError):
    """A config file field that is missing, unknown or of the wrong kind."""


@dataclass
class MergeJob:
    method: str
    pretrained: str | OpenClipSource
    finetuned: dict[str, str | OpenClipSource]
    options: CALMConfig | DataFreeConfig
    output: str
    factory: str | None = None
    factory_args: dict = field(default_factory=dict)
    device: str | None = None
    seed: int = 0
    shard_size: int = DEFAULT_MAX_SHARD_BYTES
    resume: bool = True
    overwrite: bool = False
    folder: str = "."
    clip: object | None = None  # clip_tasks.CLIPTasks: the task_vectors block

    @property
    def progress_file(self) -> str | None:
        if not (methods.get(self.method).needs_data and self.resume):
            return None
        return f"{self.output.rstrip(os.sep)}.progress.safetensors"

    def weights(self, progress=None):
        """(pretrained, finetuned) as merge() takes them: paths stay paths (read lazily)."""
        if self.clip is not None:
            return self.clip.weights(progress)
        pretrained = self.pretrained
        if isinstance(pretrained, OpenClipSource):
            pretrained = pretrained.load("pretrained")
        return pretrained, {task: src.weights(f"task {task!r}") if isinstance(src, OpenClipSource) else src
                            for task, src in self.finetuned.items()}

    def build(self, progress=None) -> dict:
        """heads / data / model / forward from the factory, or from the task_vectors block (CALM)."""
        if self.clip is not None:
            return self.clip.calm_inputs(self.device, progress) if methods.get(self.method).needs_data else {}
        if self.factory is None:
            return {}
        made = load_factory(self.factory, self.folder)(**self.factory_args)
        if not isinstance(made, dict) or not {"heads", "data"} <= set(made):
            raise ConfigError(f"factory {self.factory!r} must return a dict with 'heads' and 'data' "
                              "(and optionally 'model', 'forward')")
        unknown = sorted(set(made) - {"heads", "data", "model", "forward"})
        if unknown:
            raise ConfigError(f"factory {self.factory!r} returned unknown entries {unknown}")
        return made


def _fail(name: str, allowed: str, value) -> typing.NoReturn:
    raise ConfigError(f"field {name!r}: must be {allowed}, got {value!r}")


def _path(folder: str, value, name: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(name, "a path (string)", value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))


@dataclass(frozen=True)
class OpenClipSource:
    model: str
    checkpoint: str | None

    def load(self, what: str) -> torch.nn.Module:
        """The architecture with the checkpoint's weights (pretrained: CALM runs it)."""
        from .checkpoint import open_clip_model

        return open_clip_model(self.model, self.checkpoint, what=what)

    def weights(self, what: str):
        """Only the checkpoint's weights, read lazily (fine-tuned copies: no module per task)."""
        from .checkpoint import read_without_prefix

        if self.checkpoint is None:
            raise ConfigError(f"{what}: an open_clip fine-tuned source needs a checkpoint")
        return read_without_prefix(self.checkpoint, what)


def _source(folder: str, value, name: str):
    """A checkpoint path, or an open_clip model name with its checkpoint (built when the job runs)."""
    if isinstance(value, dict):
        if set(value) - {"open_clip", "checkpoint"} or not isinstance(value.get("open_clip"), str):
            _fail(name, "a path or {open_clip: MODEL_NAME, checkpoint: PATH}", value)
        checkpoint = _path(folder, value["checkpoint"], f"{name}.checkpoint") if "checkpoint" in value else None
        return OpenClipSource(value["open_clip"], checkpoint)
    return _path(folder, value, name)


def _coerce(cls, name: str, value):
    """A YAML value into the type a method's config class declares for field `name` (as written,
    or as a type where the class's module does not postpone annotations)."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    kind = kind if isinstance(kind, str) else inspect.formatannotation(kind)
    where = f"options.{name}"
    if kind == "torch.dtype":
        if value not in DTYPES:
            _fail(where, f"one of {sorted(DTYPES)}", value)
        return DTYPES[value]
    if value is None and "None" in kind:
        return None
    if kind.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _fail(where, "a list of task names", value)
        return tuple(value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            _fail(where, "true or false", value)
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, "an integer", value)
        return value
    if kind.startswith("float"):
        if kind.endswith("| str") and isinstance(value, str):  # a named choice, e.g. init_scaling: auto
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, "a number", value)
        return float(value)
    if not isinstance(value, str):
        _fail(where, "a string", value)
    return value


def _options(method: str, given, tasks: list[str]):
    chosen = methods.get(method)
    cls = chosen.config_class
    if given is None:
        given = {}
    if not isinstance(given, dict):
        _fail("options", f"a mapping of {cls.__name__} fields", given)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"field 'options': {unknown} are not options of method {method!r}; "
                          f"allowed: {names}")
    options = cls(**{name: _coerce(cls, name, value) for name, value in given.items()})
    try:
        chosen.validate(options, len(tasks))
    except ValueError as exc:
        raise ConfigError(f"field 'options': {exc}") from exc
    return options


def parse(raw: dict, folder: str = ".") -> MergeJob:
    """A MergeJob from the config's mapping; paths resolve against `folder`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of fields {FIELDS}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    clip = None
    if "task_vectors" in raw:
        clash = sorted(set(raw) & {"pretrained", "finetuned", "factory", "factory_args"})
        if clash:
            raise ConfigError(f"field 'task_vectors' replaces {clash}: give one or the other")
        clip = _task_vectors(folder, raw["task_vectors"])
        raw = {**raw, "pretrained": clip.layout.zeroshot,
               "finetuned": {t: clip.layout.finetuned(t) for t in clip.tasks}}
    for name in ("pretrained", "finetuned", "output"):
        if name not in raw:
            raise ConfigError(f"field {name!r} is required")
    method = raw.get("method", "calm")
    if method not in methods.METHODS:
        _fail("method", f"one of {list(methods.METHODS)}", method)
    needs_data = methods.get(method).needs_data
    if clip is not None and needs_data and clip.data is None:
        raise ConfigError(f"field 'task_vectors.data' is required for method {method!r} "
                          "(the unlabeled images per task)")
    finetuned = raw["finetuned"]
    if not isinstance(finetuned, dict) or not finetuned:
        _fail("finetuned", "a non-empty mapping of task name -> checkpoint", finetuned)
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        _fail("device", "auto, cpu, cuda or cuda:N", device)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        _fail("seed", "an integer", seed)
    try:
        shard_size = parse_size(raw.get("shard_size", DEFAULT_MAX_SHARD_BYTES))
    except ValueError:
        _fail("shard_size", "a size such as 5GB, 500MB or a byte count", raw.get("shard_size"))
    flags = {}
    for name, default in (("resume", True), ("overwrite", False)):
        flags[name] = raw.get(name, default)
        if not isinstance(flags[name], bool):
            _fail(name, "true or false", flags[name])
    factory, factory_args = raw.get("factory"), raw.get("factory_args", {})
    if needs_data and factory is None and clip is None:
        raise ConfigError(f"field 'factory' is required for method {method!r} (heads and unlabeled data come "
                          "from it: 'file.py:function' or 'package.module:function')")
    if factory is not None and (not isinstance(factory, str) or ":" not in factory):
        _fail("factory", "'file.py:function' or 'package.module:function'", factory)
    if not isinstance(factory_args, dict):
        _fail("factory_args", "a mapping of keyword arguments", factory_args)
    tasks = [str(t) for t in finetuned]
    return MergeJob(
        method=method, pretrained=_source(folder, raw["pretrained"], "pretrained"),
        finetuned={str(t): _source(folder, v, f"finetuned.{t}") for t, v in finetuned.items()},
        options=_options(method, raw.get("options"), tasks), output=_path(folder, raw["output"], "output"),
        factory=factory, factory_args=factory_args, device=None if device == "auto" else device,
        seed=seed, shard_size=shard_size, folder=folder, clip=clip, **flags)


def _task_vectors(folder: str, value):
    """The task_vectors block as a CLIPTasks (its checkpoint and image folders checked to exist)."""
    from .clip_tasks import CLIPTasks

    if not isinstance(value, dict):
        _fail("task_vectors", "a mapping with root, tasks, data, ...", value)
    unknown = sorted(set(value) - set(TASK_VECTORS_FIELDS))
    if unknown:
        raise ConfigError(f"field 'task_vectors': unknown field(s) {unknown}; allowed: {list(TASK_VECTORS_FIELDS)}")
    if "root" not in value and not ("pretrained" in value and "finetuned" in value):
        raise ConfigError("field 'task_vectors.root' is required (the checkpoints/<model> folder, or a FusionBench "
                          "root; or give pretrained and finetuned folders)")
    tasks = value.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        _fail("task_vectors.tasks", "a non-empty list of task names", value.get("tasks"))
    paths = {name: _path(folder, value[name], f"task_vectors.{name}") if value.get(name) is not None else None
             for name in ("root", "data", "text_tower", "heads_cache", "pretrained")}
    finetuned = value.get("finetuned")
    if finetuned is not None:
        if not isinstance(finetuned, dict) or not finetuned:
            _fail("task_vectors.finetuned", "a mapping of task -> Hugging Face CLIPVisionModel folder", finetuned)
        finetuned = {str(t): _path(folder, f, f"task_vectors.finetuned.{t}") for t, f in finetuned.items()}
    zeroshot = value.get("zeroshot")
    if isinstance(zeroshot, str):
        zeroshot = _read_mapping(_path(folder, zeroshot, "task_vectors.zeroshot"), "task_vectors.zeroshot")
    if zeroshot is not None and not isinstance(zeroshot, dict):
        _fail("task_vectors.zeroshot", "a file or a mapping of task -> {classes: [...], templates: [...]}", zeroshot)
    for name in ("workers", "batch_size"):
        given = value.get(name)
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
            _fail(f"task_vectors.{name}", "a positive integer", given)
    model = value.get("model")
    if model is not None and not isinstance(model, str):
        _fail("task_vectors.model", "an open_clip model name such as ViT-B-32", model)
    try:
        return CLIPTasks(paths["root"], tasks, paths["data"], model=model, zeroshot=zeroshot,
                         text_tower=paths["text_tower"], heads_cache=paths["heads_cache"],
                         workers=value.get("workers"), batch_size=value.get("batch_size") or 128,
                         pretrained=paths["pretrained"], finetuned=finetuned)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"field 'task_vectors': {exc}") from exc


def _read_yaml(path: str, prefix: str = ""):
    """A YAML (or JSON) file's content; a parse error names the file."""
    import yaml

    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{prefix}{path} is not valid YAML: {exc}") from exc


def _read_mapping(path: str, name: str) -> dict:
    """A YAML (or JSON) file holding a mapping."""
    if not os.path.exists(path):
        raise ConfigError(f"field {name!r}: no file {path}")
    value = _read_yaml(path, f"field {name!r}: ")
    if not isinstance(value, dict):
        raise ConfigError(f"field {name!r}: {path} must hold a mapping of task -> {{classes, templates}}")
    return value


def load(path: str) -> MergeJob:
    """Parse and validate a YAML config file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: no config file at {path}")
    raw = _read_yaml(path)
    try:
        return parse(raw, os.path.dirname(os.path.abspath(path)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_factory(spec: str, folder: str = "."):
    """'file.py:function' (relative to `folder`) or 'package.module:function'."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = target if os.path.isabs(target) else os.path.join(folder, target)
        if not os.path.exists(path):
            raise ConfigError(f"field 'factory': no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"calm_fast_factory_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"field 'factory': cannot import {target!r} ({exc})") from exc
    if not callable(getattr(module, name, None)):
        raise ConfigError(f"field 'factory': {target} has no function {name!r}")
    return getattr(module, name)
