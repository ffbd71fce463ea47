"""Consensus / TALL: masks mt = [|τt| ≥ λt |Σs τs − τt|], keep scalars at least `min_votes` tasks
agree on, then λ Σt τt."""
from .data_free import ConsensusArguments, DataFreeMethod


class Consensus(DataFreeMethod):
    name = "consensus"
    summary = "TALL masks, scalars kept by at least min_votes tasks, × λ"

    def validate(self, config, num_tasks):
        super().validate(config, num_tasks)
        if not 0 <= config.min_votes <= num_tasks:
            raise ValueError(f"calm_fast: min_votes must lie in [0, {num_tasks}], got {config.min_votes}")

    def arguments(self, config, num_tasks, thresholds=None):
        return ConsensusArguments("consensus", [config.scaling] * num_tasks, [config.tall_lambda] * num_tasks,
                                  config.min_votes)
