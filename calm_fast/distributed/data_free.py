"""The data-free merges (task arithmetic, TIES, TALL, average) split over the ranks of a group.

Every rank knows every key's shape and dtype (checkpoint headers), so the split needs no
collective: rank r owns a contiguous run of pretrained's keys of about 1/world of the bytes
(`partition`), reads only those from the (lazy) checkpoints, and merges them exactly as one
process does (baselines.merge_data_free), one output shard at a time. The one global quantity,
TIES' per-task threshold over the whole model, comes from the distributed select. The weights
are bit-identical to calm_fast.merge()'s; each rank writes its own safetensors shards and rank 0
the index and report.json, all in one temporary folder renamed into place when every shard is
on disk (`output` must be on a filesystem every rank sees).
"""
from __future__ import annotations

import os

import torch.distributed as dist

from .. import methods, state
from ..baselines import DataFreeConfig, task_vectors
from ..baselines import merge_data_free as merge_keys
from ..checkpoint import DEFAULT_MAX_SHARD_BYTES, plan_shards, read_checkpoint, shard_names, spec, write_index
from ..merge import REPORT_FILE, MergeResult, report_json, resolve_device
from .collectives import agree, run_checked
from .output import output_path, publish
from .select import magnitude_threshold


def partition(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Keys in order, cut into `world` contiguous runs of about equal bytes: a key goes to the
    rank whose share [r, r+1)·total/world holds the middle of its bytes."""
    total = sum(sizes.values())
    runs, done = [[] for _ in range(world)], 0
    for key, size in sizes.items():
        runs[min(world - 1, (2 * done + size) * world // (2 * total)) if total else 0].append(key)
        done += size
    return runs


def shard_plan(runs: list[list[str]], sizes: dict[str, int], max_shard_bytes: int) -> list[tuple[int, str, list[str]]]:
    """(rank, file name, keys) of every output file: each rank's run cut by checkpoint.plan_shards,
    numbered in rank order as model-0000i-of-0000n.safetensors; a lone file is model.safetensors,
    as checkpoint.write_safetensors_dir names it."""
    parts = [(rank, keys) for rank, run in enumerate(runs)
             for keys in plan_shards({k: sizes[k] for k in run}, max_shard_bytes) if keys] or [(0, [])]
    return [(rank, name, keys) for (rank, keys), name in zip(parts, shard_names(len(parts)))]


def _load(pretrained, finetuned, method: methods.MergeMethod, config: DataFreeConfig, output: str, overwrite: bool):
    """What merge() validates, on each rank: keys, shapes, dtypes, config; and a free output."""
    tasks = state.named_tasks(finetuned)
    base = state.load_state_dict(pretrained, what="pretrained")
    tuned = {name: state.load_state_dict(src, what=f"task {name!r}") for name, src in tasks.items()}
    keys = state.validate(base, tuned)
    method.validate(config, len(tuned))
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"calm_fast: {output} exists; pass overwrite=True to replace it")
    return base, tuned, keys


def _ties_thresholds(base, tuned, mine, every, density: float, device, group) -> list[float]:
    """baselines.ties_thresholds over all ranks' keys: per task, the k-th largest |τ| over `every`
    merged key, k = density · N as one process counts it; each rank holds τ of `mine` only."""
    k = int(density * sum(spec(base, key)[0].numel() for key in every))
    thresholds = []
    for name, weights in tuned.items():
        taus = run_checked(f"TIES task vectors of task {name!r}",
                           lambda: [task_vectors(base[key], [weights], key, device)[0] for key in mine], group)
        thresholds.append(float(magnitude_threshold(taus, k, group)[0]))
        del taus  # before the next task's: one task's vectors of this rank's keys at a time
    return thresholds


def _arguments(method: str, config, output, device):
    """(the method, its config, output as an absolute path, the device), checked."""
    chosen = methods.get(method)
    if chosen.needs_data:
        raise ValueError(f"calm_fast: {method!r} is not a data-free method; one of {methods.DATA_FREE}")
    return chosen, chosen.config(config), output_path(output), resolve_device(device)


def merge_data_free(pretrained, finetuned, method: str = "task_arithmetic", config: DataFreeConfig | None = None,
                    output=None, *, seed: int = 0, device=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = False, group=None):
    """calm_fast.merge(pretrained, finetuned, method=...).save(output) for a data-free method, run
    by every rank of `group` (an initialized process group; its timeout bounds every wait).

    Inputs as merge() takes them; checkpoint paths are read lazily, each rank reading only its
    keys. Before any work the ranks check that they agree on method, config, seed (which the
    data-free methods never draw from), tasks, keys, shapes, dtypes and output; a disagreement,
    a rank's failure or a lost rank raises DistributedMergeError on every rank that can still
    hear, naming the rank. Peak memory per rank: one output shard of merged weights (bounded by
    max_shard_bytes) plus one parameter per task; TIES adds one task's vectors of its keys.
    Returns a MergeResult whose state_dict reads the written output lazily.
    """
    from .. import __version__

    chosen, config, output, device = _arguments(method, config, output, device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    base, tuned, keys = run_checked("loading the inputs",
                                    lambda: _load(pretrained, finetuned, chosen, config, output, overwrite), group)
    specs = {key: spec(base, key) for key in base}
    agree({"method": method, "config": repr(config), "seed": seed, "tasks": list(tuned), "output": output,
           "max_shard_bytes": max_shard_bytes, "overwrite": overwrite, "calm_fast": __version__,
           "parameters": [(key, tuple(shape), str(dtype)) for key, (shape, dtype) in specs.items()]},
          "merge_data_free", group)

    sizes = {key: shape.numel() * dtype.itemsize for key, (shape, dtype) in specs.items()}
    runs = partition(sizes, world)
    plan = shard_plan(runs, sizes, max_shard_bytes)
    merged = set(keys)
    thresholds = None
    if chosen.needs_thresholds:
        mine = [key for key in runs[rank] if key in merged]
        thresholds = _ties_thresholds(base, tuned, mine, keys, config.density, device, group)

    header = {"format": "pt", "calm_fast_method": method}

    def write_shard(folder: str, name: str, shard: list[str]) -> None:
        """One output file: its merged keys through the single-process code, its other entries
        carried from pretrained; only this shard's merged tensors are held."""
        from safetensors.torch import save_file

        values = merge_keys(base, tuned, [key for key in shard if key in merged], chosen, config, device,
                            thresholds=thresholds)
        out = {key: (values.pop(key) if key in merged else base[key]).to("cpu", specs[key][1]).contiguous()
               for key in shard}
        save_file(out, os.path.join(folder, name), metadata=header)

    def write(folder: str) -> None:
        run_checked("writing shards", lambda: [write_shard(folder, name, shard)
                                               for owner, name, shard in plan if owner == rank], group)
        if rank == 0:
            write_index(folder, [(name, shard) for _, name, shard in plan], sum(sizes.values()))
            with open(os.path.join(folder, REPORT_FILE), "w") as f:
                f.write(report_json(MergeResult(method, {}, config=config)))

    publish(output, write, overwrite=overwrite, group=group)
    return MergeResult(method, read_checkpoint(output, "merged"), config=config)
