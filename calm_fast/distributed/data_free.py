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

import json
import os
import shutil

import torch
import torch.distributed as dist

from .. import state
from ..baselines import DATA_FREE_METHODS, DataFreeConfig, merge_data_free as merge_keys, task_vectors
from ..checkpoint import (DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, atomic_directory,
                          plan_shards, read_checkpoint, spec)
from .collectives import DistributedMergeError, agree, gather_checked, run_checked
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
    if len(parts) == 1:
        return [(parts[0][0], SAFETENSORS_SINGLE, parts[0][1])]
    return [(rank, f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors", keys) for i, (rank, keys) in enumerate(parts)]


def _load(pretrained, finetuned, method: str, config: DataFreeConfig, output: str, overwrite: bool):
    """What merge() validates, on each rank: keys, shapes, dtypes, config; and a free output."""
    tasks = state.named_tasks(finetuned)
    base = state.load_state_dict(pretrained, what="pretrained")
    tuned = {name: state.load_state_dict(src, what=f"task {name!r}") for name, src in tasks.items()}
    keys = state.validate(base, tuned)
    config.validate(len(tuned), method)
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
    from ..merge import REPORT_FILE, MergeResult, report_json  # here, not at the top: merge.py calls into this module

    if method not in DATA_FREE_METHODS:
        raise ValueError(f"calm_fast: {method!r} is not a data-free method; one of {DATA_FREE_METHODS}")
    config = config or DataFreeConfig()
    if not isinstance(config, DataFreeConfig):
        raise TypeError(f"calm_fast: method {method!r} takes a DataFreeConfig, got {type(config).__name__}")
    if output is None:
        raise ValueError("calm_fast: a distributed merge writes its result: pass output=")
    output = os.path.abspath(os.fspath(output))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    base, tuned, keys = run_checked("loading the inputs",
                                    lambda: _load(pretrained, finetuned, method, config, output, overwrite), group)
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
    if method == "ties":
        mine = [key for key in runs[rank] if key in merged]
        thresholds = _ties_thresholds(base, tuned, mine, keys, config.density, device, group)

    header = {"format": "pt", "calm_fast_method": method}

    def write_shard(folder: str, name: str, shard: list[str]) -> None:
        """One output file: its merged keys through the single-process code, its other entries
        carried from pretrained; only this shard's merged tensors are held."""
        from safetensors.torch import save_file

        values = merge_keys(base, tuned, [key for key in shard if key in merged], method, config, device,
                            thresholds=thresholds)
        out = {key: (values.pop(key) if key in merged else base[key]).to("cpu", specs[key][1]).contiguous()
               for key in shard}
        save_file(out, os.path.join(folder, name), metadata=header)

    def fill(folder: str | None) -> None:
        """Runs on every rank; on rank 0 inside atomic_directory, which renames `folder` into
        place once this returns, and removes it when this raises (as it does on every rank when
        any rank fails)."""
        folder = gather_checked("sharing the output folder", lambda: folder, group)[0]
        try:
            run_checked("writing shards", lambda: [write_shard(folder, name, shard)
                                                   for owner, name, shard in plan if owner == rank], group)
        except DistributedMergeError:
            shutil.rmtree(folder, ignore_errors=True)  # on every rank: none returns before it is gone
            raise
        if rank == 0:
            if len(plan) > 1:
                index = {"metadata": {"total_size": sum(sizes.values())},
                         "weight_map": {key: name for _, name, shard in plan for key in shard}}
                with open(os.path.join(folder, SAFETENSORS_INDEX), "w") as f:
                    json.dump(index, f, indent=2)
            result = MergeResult(method, {}, config=config)
            with open(os.path.join(folder, REPORT_FILE), "w") as f:
                f.write(report_json(result))

    run_checked("publishing the output",
                lambda: atomic_directory(output, fill, overwrite=overwrite) if rank == 0 else fill(None), group)
    return MergeResult(method, read_checkpoint(output, "merged"), config=config)
