"""What every merge method is: a name, a config class, whether it needs data, one validate and one run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MergeInputs:
    """Everything merge() has gathered and checked before a method runs."""

    pretrained: Any  # as the caller gave it (a module stands in for `model`)
    base: Any  # pretrained as a state dict (lazy for checkpoint paths)
    tuned: dict  # task -> state dict
    keys: list[str]  # the merged (floating-point) keys
    device: torch.device
    progress: Any = None  # iterable, **tqdm options -> wrapped iterable; None: quiet
    seed: int = 0
    model: torch.nn.Module | None = None
    heads: dict | None = None
    data: dict | None = None
    forward: Any = None
    progress_file: str | None = None
    augment: Any = None  # CALM: augment(batch, generator) -> batch, on mask-training batches


@dataclass
class Merged:
    """A method's output: merged values for inputs.keys, and CALM's masks and report."""

    values: dict[str, torch.Tensor]
    masks: Any = None
    report: Any = None
    extra: dict = field(default_factory=dict)


class MergeMethod:
    """One merge method. Subclasses set the class attributes and implement run()."""

    name: str
    config_class: type
    needs_data: bool = False  # heads, unlabeled data and the architecture, per task
    summary: str = ""

    def config(self, given=None):
        """`given`, or the defaults, checked to be this method's config class."""
        config = self.config_class() if given is None else given
        if not isinstance(config, self.config_class):
            raise TypeError(f"calm_fast: method {self.name!r} takes a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        return config

    def validate(self, config, num_tasks: int) -> None:
        """Raise ValueError for a config this method cannot run with `num_tasks` tasks."""
        config.validate()

    def check_inputs(self, inputs: MergeInputs) -> None:
        """Raise for missing or inconsistent method-specific inputs (CALM's heads, data, model)."""

    def run(self, inputs: MergeInputs, config) -> Merged:
        raise NotImplementedError
