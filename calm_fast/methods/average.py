"""Weight averaging: θ0 + mean_t τt."""
from .data_free import ConsensusArguments, DataFreeMethod


class Average(DataFreeMethod):
    name = "average"
    summary = "θ0 + mean of the task vectors"

    def arguments(self, config, num_tasks, thresholds=None):
        return ConsensusArguments("sum", [1.0 / num_tasks] * num_tasks, [])
