"""CALM over FSDP2 shards: the model sharded by torch's own `fully_shard`, and ShardedLayout, which
keeps S and δ as shards matching each rank's parameter shards and forms every global value
(the top-k threshold, the normalized step, pseudo-labels, mask counts) with collectives.

FSDP2 shards every parameter on dim 0 as torch.chunk does: rank r holds rows
[r·c, min((r+1)·c, n)), c = ceil(n / world), possibly none. Parameters fully_shard cannot
shard (0-d ones) and buffers stay whole on every rank ("replicated"); rank 0 alone counts them
in global totals, and their gradients are all-reduced here, since FSDP does not touch them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .. import ops, sampling
from ..calm.layout import Layout
from .collectives import collective, comm_device, gather_objects, normalized_step_size
from .select import magnitude_threshold


def shard_model(model: torch.nn.Module, device: torch.device, group=None) -> torch.nn.Module:
    """fully_shard on every block of the model's ModuleLists (the transformer layers), on each of
    the root's children (embeddings, LM head, the stem: none is gathered for the whole forward)
    and on the root, over a 1-D mesh of the group's ranks on `device`'s type: in forward and
    backward about one unit at a time is whole. fully_shard moves each unit to the device as it shards it, so a
    model built on the host is never whole on the device. 0-d parameters, which fully_shard
    refuses, stay whole on every rank (moved to the device here)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh(device.type, dist.get_process_group_ranks(group) if group is not None
                      else list(range(dist.get_world_size())))
    units = {block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module}
    units |= {child for child in model.children()
              if not isinstance(child, torch.nn.ModuleList) and any(True for _ in child.parameters())}
    for module in [*(m for m in reversed(list(model.modules())) if m in units), model]:  # inner units first
        scalars = {p for p in module.parameters() if p.dim() == 0}
        # resharded after every forward, the root too: CALM writes the shards between forwards
        # (each task's weights for its pseudo-labels), which a kept whole copy would not see
        fully_shard(module, mesh=mesh, ignored_params=scalars or None, reshard_after_forward=True)
    for module in model.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and not isinstance(tensor, DTensor):
                tensor.data = tensor.data.to(device)
    return model


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the dim-0 rows rank `rank` holds, as torch.chunk and FSDP2 split them."""
    per_rank = -(-rows // world)
    return min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)


class ShardedLayout(Layout):
    """This rank's FSDP2 shard of each merged tensor; totals and choices over all ranks."""

    def __init__(self, model: torch.nn.Module, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.writes = self.rank == 0
        own = model.state_dict(keep_vars=True)
        self.shapes = {key: tuple(t.shape) for key, t in own.items()}
        self.sharded = {key for key, t in own.items() if isinstance(t, DTensor)}

    # ---- this rank's part ----------------------------------------------------------------------
    def local(self, tensor):
        return tensor.detach().to_local() if isinstance(tensor, DTensor) else tensor.data

    def local_grad(self, tensor):
        grad = tensor.grad
        return grad.to_local() if isinstance(grad, DTensor) else grad

    def _rows(self, key: str) -> tuple[int, int]:
        return row_range(self.shapes[key][0], self.rank, self.world)

    def _row_numel(self, key: str) -> int:
        shape = self.shapes[key]
        return torch.Size(shape[1:]).numel()

    def part(self, key, full):
        if key not in self.sharded:
            return full
        start, stop = self._rows(key)
        return full[start:stop]

    def local_mask(self, key, packed):
        if key not in self.sharded:
            return packed
        shape = self.shapes[key]
        whole = ops.unpack_mask(packed, torch.Size(shape).numel()).view(shape)
        return ops.pack_mask(self.part(key, whole).contiguous())

    def counted(self, key):
        return key in self.sharded or self.rank == 0

    # ---- totals over ranks ---------------------------------------------------------------------
    def threshold(self, keys, magnitudes, k):
        """The distributed select over every rank's shards; a replicated tensor takes part on rank
        0 only, and the other ranks take rank 0's tie quota for it. Ties are filled in the order
        (parameter, flat offset), as one process fills them over the whole model."""
        mine = [m if self.counted(key) else m.new_empty(0) for key, m in zip(keys, magnitudes)]
        order = [(i, self._rows(key)[0] * self._row_numel(key) if key in self.sharded else 0, self.rank)
                 for i, key in enumerate(keys)]
        threshold, quota = magnitude_threshold(mine, k, self.group, order=order)
        replicated = [i for i, key in enumerate(keys) if key not in self.sharded]
        if replicated:
            given = gather_objects([int(quota[i]) for i in replicated], "initial mask: replicated quotas", self.group)
            quota = quota.clone()
            quota[replicated] = torch.tensor(given[0], dtype=quota.dtype, device=quota.device)
        return threshold, quota

    def sum(self, values):
        total = values.to(comm_device(self.group)).clone()
        collective("sum over ranks", lambda: dist.all_reduce(total, group=self.group), self.group)
        return total.to(values.device)

    def step_size(self, sums, count, lr):
        local = torch.stack(sums).sum() if sums else torch.zeros(())
        return normalized_step_size(local, count, lr, self.group)

    def reduce_grads(self, tensors):
        """FSDP averages the sharded parameters' gradients over ranks; the replicated ones here."""
        for t in tensors.values():
            if t.grad is not None and not isinstance(t.grad, DTensor):
                grad = t.grad.to(comm_device(self.group))
                collective("replicated gradients", lambda: dist.all_reduce(grad, group=self.group), self.group)
                t.grad.copy_(grad.div_(self.world))

    # ---- data ----------------------------------------------------------------------------------
    def score(self, forward, head, pool, batch_size, device, progress=None, desc=""):
        """Rank r scores a contiguous run of the pool's batches (the very batches one process
        scores, so every example's entropy is the same bit for bit); every rank runs the same
        number of forwards, as FSDP's gathers need, repeating a batch where it has none left;
        the results are all-gathered in order."""
        size = sampling.pool_size(pool)
        batches = -(-size // batch_size)
        first, last = row_range(batches, self.rank, self.world)
        per_rank = -(-batches // self.world)
        rows = torch.arange(min(first * batch_size, size), min(last * batch_size, size))
        h, y = (sampling.score(forward, head, sampling.take(pool, rows), batch_size, device,
                               progress if self.writes else None, desc) if len(rows)
                else (torch.empty(0), torch.empty(0, dtype=torch.int64)))
        for _ in range(per_rank - (last - first)):  # keep FSDP's collectives in step
            with torch.no_grad():
                forward(sampling.take(pool, torch.arange(min(batch_size, size)), device))
        parts = gather_objects((h, y), "pseudo-labels: entropies", self.group)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def rows(self, batch):
        start, stop = row_range(len(batch), self.rank, self.world)
        return batch[start:stop]

    def loss(self, logits, labels, global_rows):
        """This rank's rows' summed loss × world / global rows: FSDP's average over ranks of the
        gradients is then the gradient of the global batch's mean loss."""
        return F.cross_entropy(logits, labels, reduction="sum") * (self.world / global_rows)

    def packed_mask(self, key, logits):
        whole = self.gather(key, logits)
        return None if whole is None else ops.pack_mask(whole)

    def gather(self, key: str, local: torch.Tensor) -> torch.Tensor | None:
        """On the writing rank (0), the whole tensor shaped like `key` from every rank's rows of it;
        None elsewhere (a gather to rank 0: the others send their rows and hold nothing more)."""
        if key not in self.sharded:
            return local if self.writes else None
        shape = self.shapes[key]
        per_rank = -(-shape[0] // self.world)
        padded = local.new_zeros((per_rank, *shape[1:]), device=comm_device(self.group))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.writes else None
        root = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        collective(f"gathering {key}", lambda: dist.gather(padded, parts, dst=root, group=self.group), self.group)
        return torch.cat(parts)[: shape[0]].to(local.device) if self.writes else None
