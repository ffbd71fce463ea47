"""The mask file: CALM's bit-packed masks plus what replay needs, in one safetensors file.

Tensors: `mask.{i}.{key}` = the packed mask (uint8, 1 bit per scalar) of sequential step i for
parameter `key`. Header metadata: `format`, `calm_fast_version`, and `meta`, a JSON object with
the tasks, the initial group, the finished sequential steps in order, each merged parameter's
shape, the parameters each step left unmasked (no gradient reached them), the initial scaling
and the whole CALM config. A progress file (resumable run) is the same file with a `resume`
JSON entry and `resume.*` tensors: the pseudo-labels chosen and the sampling generator's state.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointError, atomic_file

FORMAT = "calm_fast.masks/1"


def config_as_json(config) -> dict:
    """A config dataclass as plain JSON values (dtypes by name, tuples as lists)."""
    def plain(value):
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        if isinstance(value, tuple):
            return list(value)
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


@dataclass
class Masks:
    tasks: list[str]
    initial: list[str]
    sequential: list[str]  # finished steps, in order
    parameters: dict[str, list[int]]  # merged key -> shape
    no_grad_keys: dict[str, list[str]]  # step task -> keys that kept the 0.5 / 0.5 average
    init_scaling: float
    config: dict
    bits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # step task -> key -> packed
    version: str = ""

    def steps(self, key: str, device) -> list[tuple[str, torch.Tensor | None]]:
        """(task, packed bits or None) per finished step for one parameter, as merged_parameter takes."""
        return [(task, None if key in self.no_grad_keys[task] else self.bits[task][key].to(device))
                for task in self.sequential]


def _meta(masks: Masks) -> dict:
    return {"tasks": masks.tasks, "initial": masks.initial, "sequential": masks.sequential,
            "parameters": masks.parameters, "no_grad_keys": masks.no_grad_keys,
            "init_scaling": masks.init_scaling, "config": masks.config}


def write(path: str, masks: Masks, resume: dict | None = None,
          resume_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write atomically: a temporary file beside `path`, renamed into place."""
    from safetensors.torch import save_file

    from . import __version__

    tensors = {f"mask.{i}.{key}": bits.contiguous()
               for i, task in enumerate(masks.sequential) for key, bits in masks.bits[task].items()}
    tensors.update({f"resume.{name}": t.contiguous() for name, t in (resume_tensors or {}).items()})
    header = {"format": FORMAT, "calm_fast_version": __version__, "meta": json.dumps(_meta(masks))}
    if resume is not None:
        header["resume"] = json.dumps(resume)
    atomic_file(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def read(path: str) -> tuple[Masks, dict | None, dict[str, torch.Tensor]]:
    """(masks, resume JSON or None, resume tensors) from a mask or progress file."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: no mask file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(f"calm_fast: {path} is not a calm_fast mask file "
                                      f"(format {header.get('format')!r}, expected {FORMAT!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"calm_fast: {path} is not a readable mask file ({exc})") from exc
    meta = json.loads(header["meta"])
    masks = Masks(**meta, version=header.get("calm_fast_version", ""))
    for i, task in enumerate(masks.sequential):
        prefix = f"mask.{i}."
        masks.bits[task] = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        expected = set(masks.parameters) - set(masks.no_grad_keys[task])
        if set(masks.bits[task]) != expected:
            raise CheckpointError(f"calm_fast: {path}: step {task!r} lacks masks for "
                                  f"{sorted(expected - set(masks.bits[task]))[:3]}")
    resume = json.loads(header["resume"]) if "resume" in header else None
    resume_tensors = {name[len("resume."):]: t for name, t in tensors.items() if name.startswith("resume.")}
    return masks, resume, resume_tensors


def check_fits(masks: Masks, pretrained, keys, tasks, path) -> None:
    """The masks were made for these parameters (names, shapes) and these tasks."""
    from .checkpoint import spec

    absent = sorted((set(masks.initial) | set(masks.sequential)) - set(tasks))
    if absent:
        raise ValueError(f"calm_fast: the masks in {path} were made with task(s) {absent} that are not given")
    if set(masks.parameters) != set(keys):
        missing, extra = sorted(set(masks.parameters) - set(keys)), sorted(set(keys) - set(masks.parameters))
        raise KeyError(f"calm_fast: the masks in {path} do not fit these weights: parameters only in the "
                       f"masks {missing[:3]}, only in the weights {extra[:3]}")
    for key in keys:
        shape = list(spec(pretrained, key)[0])
        if shape != masks.parameters[key]:
            raise ValueError(f"calm_fast: the masks in {path} give {key} shape {masks.parameters[key]}, "
                             f"the weights have {shape}")
