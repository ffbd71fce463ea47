"""The data-free methods' common shape: each is one call of the consensus_merge op per parameter,
with its own (op method, weights, thresholds, votes); baselines.merge_data_free runs it."""
from __future__ import annotations

from dataclasses import dataclass

from .. import baselines
from ..baselines import DataFreeConfig
from .base import Merged, MergeInputs, MergeMethod


@dataclass(frozen=True)
class ConsensusArguments:
    """ops.consensus_merge's arguments beyond the task vectors."""

    op: str  # "sum", "ties" or "consensus"
    weights: list[float]
    thresholds: list[float]
    votes: int = 0


class DataFreeMethod(MergeMethod):
    config_class = DataFreeConfig
    needs_thresholds = False  # TIES: per-task magnitude thresholds over the whole model

    def validate(self, config: DataFreeConfig, num_tasks: int) -> None:
        config.validate()

    def arguments(self, config: DataFreeConfig, num_tasks: int, thresholds=None) -> ConsensusArguments:
        raise NotImplementedError

    def run(self, inputs: MergeInputs, config: DataFreeConfig) -> Merged:
        return Merged(baselines.merge_data_free(inputs.base, inputs.tuned, inputs.keys, self, config, inputs.device,
                                                inputs.progress))
