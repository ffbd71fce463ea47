"""calm_fast across the ranks of a torch.distributed process group, exact and collective:
nothing global is gathered on one rank, and every rank gets the single-process answer.

- magnitude_threshold(tensors, k, group): the k-th largest |x| over all ranks' tensors, with
  tie quotas selecting exactly k entries in a documented global order (select.py).
- normalized_step_size(local_sumsq, local_count, step_size, group): CALM's normalized step from
  each rank's local sum of squares, one all_gather of a pair (collectives.py).
- merge_calm(pretrained, finetuned, heads=, data=, output=, group=...): CALM on the model sharded
  by FSDP2, every global choice (pseudo-labels, initial mask, step) the single-process one,
  written as calm_fast.merge(...).save(output) writes it (calm.py, fsdp.py).
- merge_data_free(pretrained, finetuned, method, config, output, group=...): task arithmetic,
  TIES, TALL and averaging split by keys over ranks, written as sharded safetensors + report.json
  bit-identical in content to calm_fast.merge(...).save(output) (data_free.py).
- process_group(backend, **init_kwargs): init_process_group ... destroy_process_group around a
  merge, the group's threads gone when it returns, not left to interpreter shutdown
  (process_group.py).
Every failure, disagreement or lost rank raises DistributedMergeError on every rank still
listening, naming the rank; collectives are bounded by the process group's timeout.
"""
from .calm import merge_calm
from .collectives import DistributedMergeError, agree, normalized_step_size
from .data_free import merge_data_free, partition, shard_plan
from .fsdp import ShardedLayout, shard_model
from .process_group import process_group
from .select import magnitude_threshold

__all__ = ["DistributedMergeError", "ShardedLayout", "agree", "magnitude_threshold", "merge_calm", "merge_data_free",
           "normalized_step_size", "partition", "process_group", "shard_model", "shard_plan"]
