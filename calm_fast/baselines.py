"""What the data-free methods share (calm_fast/methods/: average, task_arithmetic, ties,
consensus): their config, task vectors and the per-parameter loop through the one
consensus_merge op. Task vectors are formed per parameter in fp32. With lazily read checkpoints
(safetensors) peak host memory is the merged model plus one parameter × T, plus, for TIES, one
model's task vector while it measures each task's threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops

@dataclass(frozen=True)
class DataFreeConfig:
    scaling: float = 0.3  # λ of task arithmetic / TIES / consensus (the authors' value)
    density: float = 0.2  # TIES: fraction of each task vector kept
    tall_lambda: float = 0.5  # consensus: λt of the TALL masks
    min_votes: int = 2  # consensus: tasks that must agree to keep a scalar

    def validate(self) -> None:
        """What holds for every data-free method (the methods check their own fields' bounds too)."""
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"calm_fast: density must lie in (0, 1], got {self.density}")
        if self.tall_lambda < 0:
            raise ValueError(f"calm_fast: tall_lambda must be >= 0, got {self.tall_lambda}")


def task_vectors(theta0: torch.Tensor, states, key, device) -> list[torch.Tensor]:
    """τt = θt − θ0 of one parameter for each state, in fp32, contiguous, on `device`."""
    theta0 = theta0.to(device, torch.float32)
    return [(state[key].to(device, torch.float32) - theta0).contiguous() for state in states]


def ties_thresholds(pretrained, finetuned: dict, keys, density: float, device, progress=None) -> list[float]:
    """Per task, the magnitude of its k-th largest task-vector entry, k = density · N."""
    thresholds = []
    states = list(finetuned.values())
    for state in (progress(states, desc="TIES thresholds") if progress else states):
        taus = [task_vectors(pretrained[key], [state], key, device)[0] for key in keys]
        k = int(density * sum(t.numel() for t in taus))
        threshold, _ = ops.magnitude_threshold(taus, k)
        thresholds.append(float(threshold))
        del taus  # before the next task's are built: one model of task vectors at a time
    return thresholds


def merge_data_free(pretrained, finetuned: dict, keys, method, config: DataFreeConfig,
                    device, progress=None, thresholds=None) -> dict[str, torch.Tensor]:
    """Merged weights for `keys` by a data-free `method` (a methods.DataFreeMethod; the caller
    carries pretrained's other entries). TIES measures its thresholds over `keys` unless given
    them (a distributed merge measures them over every rank's keys, calm_fast.distributed)."""
    num_tasks = len(finetuned)
    method.validate(config, num_tasks)
    if method.needs_thresholds and thresholds is None:
        thresholds = ties_thresholds(pretrained, finetuned, keys, config.density, device, progress)
    args = method.arguments(config, num_tasks, thresholds)
    merged = {}
    for key in (progress(keys, desc=f"merging ({method.name})") if progress else keys):
        base = pretrained[key]
        tau = ops.consensus_merge(task_vectors(base, finetuned.values(), key, device), args.weights, args.thresholds,
                                  args.op, args.votes)
        merged[key] = (base.to(device, torch.float32) + tau).to(base.dtype).to(base.device)
    return merged
