"""TIES: trim each τt to its top `density` magnitudes (one threshold per task over the whole
model), elect signs, disjoint mean, scale by λ."""
from .data_free import ConsensusArguments, DataFreeMethod


class TIES(DataFreeMethod):
    name = "ties"
    summary = "trim to the top density, elect signs, disjoint mean, × λ"
    needs_thresholds = True

    def arguments(self, config, num_tasks, thresholds=None):
        return ConsensusArguments("ties", [config.scaling] * num_tasks, list(thresholds))
