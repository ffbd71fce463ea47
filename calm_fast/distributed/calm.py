"""CALM across the ranks of a process group, on FSDP2 (fsdp.py): each rank holds a 1/world shard
of the model, its gradients, S and δ, and runs calm_fast.calm's driver unchanged over them. The
pseudo-labels, the order and the initial masks are the single-process ones exactly; the
gradients are summed over ranks in another order, so a final mask bit may differ where a logit
ends within rounding of 0 (measured: 0 to 1 in 10^4–10^8, tests/test_distributed_calm.py and
benchmarks/results/distributed_calm_cpu.md). The output is what one process writes
(safetensors, masks.safetensors, report.json): rank 0 writes one output file at a time,
gathering each parameter to itself as it goes, never the whole model.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch.distributed as dist

from .. import maskfile, methods
from ..calm import CALMMerger
from ..checkpoint import DEFAULT_MAX_SHARD_BYTES, plan_shards, read_checkpoint, shard_names, spec, write_index
from ..merge import MASKS_FILE, REPORT_FILE, MergeResult, load_inputs, report_json, resolve_device
from .collectives import DistributedMergeError, agree, lost_peer, run_checked
from .fsdp import ShardedLayout, shard_model
from .output import output_path, publish


class GatheredState(Mapping):
    """The merged state dict as one process returns it, read key by key on the writing rank (0):
    a sharded tensor is gathered to it on access (a collective: every rank reads the same keys in
    the same order, the others get None), carried entries come from pretrained; pretrained's
    dtypes, on the CPU."""

    def __init__(self, pretrained, values: dict, layout: ShardedLayout):
        self.pretrained, self.values, self.layout = pretrained, values, layout

    def spec(self, key):
        return spec(self.pretrained, key)

    def __getitem__(self, key):
        if key not in self.values:
            return self.pretrained[key] if self.layout.writes else None
        whole = self.layout.gather(key, self.layout.local(self.values[key]))
        return None if whole is None else whole.to("cpu", self.spec(key)[1])

    def __iter__(self):
        return iter(self.pretrained)

    def __len__(self):
        return len(self.pretrained)


def _write(folder: str, state: GatheredState, masks, report_text: str, max_shard_bytes: int, group) -> None:
    """The output files into `folder`, as MergeResult.save writes them: each file's tensors are
    gathered to rank 0 in turn, and rank 0 writes the file."""
    from safetensors.torch import save_file

    writes = dist.get_rank(group) == 0
    sizes = {key: state.spec(key)[0].numel() * state.spec(key)[1].itemsize for key in state}
    shards = plan_shards(sizes, max_shard_bytes)
    files = list(zip(shard_names(len(shards)), shards))
    for name, keys in files:
        tensors = {}
        for key in keys:
            value = state[key]
            if writes:
                tensors[key] = value.contiguous()

        def save(name=name, tensors=tensors):
            if writes:
                save_file(tensors, os.path.join(folder, name), metadata={"format": "pt", "calm_fast_method": "calm"})

        run_checked(f"writing {name}", save, group)
        del tensors

    def rest():
        if writes:
            write_index(folder, files, sum(sizes.values()))
            maskfile.write(os.path.join(folder, MASKS_FILE), masks)
            with open(os.path.join(folder, REPORT_FILE), "w") as f:
                f.write(report_text)

    run_checked("writing masks and report", rest, group)


def merge_calm(pretrained, finetuned, *, heads, data, output, model=None, forward=None, augment=None, config=None,
               seed: int = 0, device=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
               progress_file=None, progress=None, group=None):
    """calm_fast.merge(..., method="calm").save(output), run by every rank of `group` (an
    initialized process group; its timeout bounds every wait).

    Inputs as merge() takes them, on every rank (each rank reads the checkpoints it needs; the
    data may differ in how it is held but must be the same examples). The model is sharded with
    FSDP2's fully_shard; `forward` must reach it through its forward() (or methods registered
    with torch.distributed.fsdp.register_fsdp_forward_method). Before the work the ranks check
    they agree on config, seed, tasks, parameters, pool sizes and output; a disagreement, a
    rank's failure or a lost rank raises DistributedMergeError on every rank that can still hear.
    progress_file resumes under the same world size only. Returns a MergeResult reading the
    written output lazily.
    """
    from .. import __version__

    calm = methods.get("calm")
    config = calm.config(config)
    output, device = output_path(output), resolve_device(device)

    def load():
        if os.path.exists(output) and not overwrite:
            raise FileExistsError(f"calm_fast: {output} exists; pass overwrite=True to replace it")
        base, tuned, keys = load_inputs(pretrained, finetuned)
        calm.validate(config, len(tuned))
        inputs = methods.MergeInputs(pretrained, base, tuned, keys, device, model=model, heads=heads, data=data)
        architecture = calm.architecture(inputs)
        sharded = shard_model(copy.deepcopy(architecture) if model is None else model, device, group)
        return base, tuned, keys, sharded

    base, tuned, keys, sharded = run_checked("loading the inputs", load, group)
    layout = ShardedLayout(sharded, group)
    merger = run_checked("preparing CALM", lambda: CALMMerger(
        base, tuned, keys, sharded, heads, data, forward, config, device, seed, progress if layout.writes else None,
        None if progress_file is None else os.path.abspath(os.fspath(progress_file)), layout, augment), group)
    agree({**merger.fingerprint(), "output": output, "overwrite": overwrite, "max_shard_bytes": max_shard_bytes,
           "progress_file": merger.progress_file, "calm_fast": __version__}, "merge (calm)", group)
    try:
        values, masks, report = merger.run()
    except DistributedMergeError:
        raise
    except RuntimeError as exc:  # a collective inside FSDP's forward or backward: a peer died or hung
        raise lost_peer("CALM (FSDP's forward or backward)", exc, group=group) from exc
    result = MergeResult("calm", {}, masks, report, config)
    state = GatheredState(base, values, layout)
    publish(output, lambda folder: _write(folder, state, masks, report_json(result), max_shard_bytes, group),
            overwrite=overwrite, group=group)
    return MergeResult("calm", read_checkpoint(output, "merged"), maskfile.read(os.path.join(output, MASKS_FILE))[0],
                       report, config)
