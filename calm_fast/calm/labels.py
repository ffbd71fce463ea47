"""CALM's stage 1 and 2: pseudo-labels by CB-EMS, and which tasks go sequential."""
from __future__ import annotations

import torch

from .. import sampling
from .config import CALMConfig
from .layout import Layout


def pseudo_labels(task: str, forward, head, pool, config: CALMConfig, device, layout: Layout = Layout(),
                  progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept pool rows, their pseudo-labels): the fine-tuned model's predictions that CB-EMS keeps
    (the lowest-entropy `ratio` of each predicted class; plain EMS with balanced=False)."""
    h, y = layout.score(forward, head, pool, config.score_batch_size, device, progress, desc=f"scoring {task}")
    keep = sampling.select_low_entropy(h, y, config.ratio, config.balanced)
    labels = y[keep]
    if len(keep) == 0:
        raise ValueError(f"calm_fast: task {task!r}: no pseudo-labelled example survives "
                         f"ratio={config.ratio} over {len(y)} examples; give it more data")
    classes = torch.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"calm_fast: task {task!r}: every pseudo-label is class "
                         f"{int(classes[0])}; its fine-tuned model or head looks collapsed")
    return keep, labels


def split_holdout(task: str, labels: torch.Tensor, fraction: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions the masks train on, positions set aside to check them) into a task's
    pseudo-labels: floor(n_c · fraction) of each pseudo-label class c, drawn at random, are set
    aside, so that the check weighs the classes as the training set does. fraction 0: all train."""
    if fraction == 0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.int64)
    aside = torch.zeros(len(labels), dtype=torch.bool)
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        aside[members[torch.randperm(len(members), generator=generator)[: int(len(members) * fraction)]]] = True
    if not aside.any() or aside.all():
        raise ValueError(f"calm_fast: task {task!r}: holdout={fraction} of {len(labels)} pseudo-labels sets "
                         f"{int(aside.sum())} aside; it must leave some to check and some to train on")
    return torch.nonzero(~aside).flatten(), torch.nonzero(aside).flatten()


def check_named(tasks: list[str], config: CALMConfig) -> None:
    """Every task the config's groups name is one of the tasks."""
    named = [t for group in (config.initial, config.sequential) if group for t in group]
    unknown = sorted(set(named) - set(tasks))
    if unknown:
        raise ValueError(f"calm_fast: order names unknown task(s) {unknown}; tasks are {tasks}")


def given_order(tasks: list[str], config: CALMConfig) -> tuple[list[str], list[str]]:
    """(initial, sequential) from the config: named groups, else the last `num_sequential` tasks."""
    check_named(tasks, config)
    if config.sequential is not None:
        sequential = list(config.sequential)
    else:
        rest = [t for t in tasks if config.initial is None or t not in config.initial]
        sequential = rest[len(rest) - min(config.num_sequential, len(tasks) - 1):]
    initial = list(config.initial) if config.initial is not None else [t for t in tasks if t not in sequential]
    overlap = sorted(set(initial) & set(sequential))
    if overlap or len(set(initial) | set(sequential)) != len(tasks):
        raise ValueError(f"calm_fast: initial {initial} and sequential {sequential} must split the "
                         f"tasks {tasks} without overlap")
    return initial, sequential


def auto_order(tasks: list[str], agreement: dict[str, float], config: CALMConfig) -> tuple[list[str], list[str], str]:
    """(initial, sequential, reason): the tasks whose own pseudo-labels the task-arithmetic model
    keeps least go sequential, least first."""
    count = min(config.num_sequential, len(tasks) - 1)
    sequential = sorted(tasks, key=lambda t: agreement[t])[:count]
    reason = (f"auto: the {count} task(s) whose pseudo-labels the task-arithmetic model "
              f"(λ={config.order_scaling}) agrees with least go sequential, least first")
    return [t for t in tasks if t not in sequential], sequential, reason
