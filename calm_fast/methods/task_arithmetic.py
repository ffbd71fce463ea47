"""Task arithmetic: θ0 + λ Σt τt."""
from .data_free import ConsensusArguments, DataFreeMethod


class TaskArithmetic(DataFreeMethod):
    name = "task_arithmetic"
    summary = "θ0 + λ · sum of the task vectors"

    def arguments(self, config, num_tasks, thresholds=None):
        return ConsensusArguments("sum", [config.scaling] * num_tasks, [])
