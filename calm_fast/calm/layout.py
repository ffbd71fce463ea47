"""Where this process's share of each merged tensor lives, and how values over the whole model
are formed from it. One process holds every tensor whole (Layout); under torch.distributed,
calm_fast.distributed.fsdp.ShardedLayout holds FSDP2 shards and forms the same values with
collectives. CALM's steps are written once, against this interface.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops, sampling


class Layout:
    """One process: every tensor whole, every total local."""

    world = 1
    writes = True  # this process writes the mask and progress files

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of a model tensor this process updates in place."""
        return tensor.data

    def local_grad(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor.grad

    def part(self, key: str, full: torch.Tensor) -> torch.Tensor:
        """This process's part of a whole tensor shaped like merged parameter `key`."""
        return full

    def local_mask(self, key: str, packed: torch.Tensor) -> torch.Tensor:
        """This process's part of a whole parameter's packed mask, packed."""
        return packed

    def counted(self, key: str) -> bool:
        """Whether this process's part of `key` counts in totals over processes (a tensor every
        process holds whole counts on one)."""
        return True

    def threshold(self, keys: list[str], magnitudes: list[torch.Tensor], k: int):
        """(threshold, tie quotas) of the k largest magnitudes over the whole model."""
        return ops.magnitude_threshold(magnitudes, k)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """values summed over processes."""
        return values

    def step_size(self, sums: list[torch.Tensor], count: int, lr: float) -> float:
        """lr / RMS of the logit step's gradient term, from per-tensor sums of squares over `count` scalars."""
        if not sums:
            return 0.0
        rms = (torch.stack(sums).sum() / count).sqrt().item()  # the update's one host sync
        return lr / rms if rms > 0 else 0.0

    def reduce_grads(self, tensors: dict) -> None:
        """Combine the gradients of a global batch over processes where the engine does not."""

    def score(self, forward, head, pool, batch_size: int, device, progress=None, desc: str = ""):
        """(entropy, argmax) over every example of the pool."""
        return sampling.score(forward, head, pool, batch_size, device, progress, desc)

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (indices into the pool)."""
        return batch

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, global_rows: int) -> torch.Tensor:
        """The loss whose gradient, combined over processes, is the global batch's mean loss gradient."""
        return F.cross_entropy(logits, labels)

    def packed_mask(self, key: str, logits: torch.Tensor) -> torch.Tensor | None:
        """[S > 0] of the whole parameter, packed, on the writing process (None elsewhere)."""
        return ops.pack_mask(logits)
