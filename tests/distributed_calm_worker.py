"""One rank of the distributed CALM tests (tests/test_distributed_calm.py starts `world` of these).

usage: distributed_calm_worker.py MODE STORE_FILE OUT_DIR PROBLEM_DIR [ARGS...], with RANK,
WORLD_SIZE and CALM_FAST_TEST_TIMEOUT in the environment. PROBLEM_DIR holds what the test wrote:
pretrained.safetensors, <task>.safetensors, problem.pt (kind, heads' state dicts, data, config).
With WORLD_SIZE=1 no process group is made: calm_fast.merge runs in one process, the reference.
Each rank writes what it found to OUT_DIR/rank<r>.json; an unexpected error exits non-zero.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from distributed_launch import gloo_threads, write_found
from merge_fixtures import CLASSES, BranchHead, BranchNet, TinyViT

import calm_fast
from calm_fast.calm import CALMMerger
from calm_fast.calm.config import AUTHORS_SCALING
from calm_fast.checkpoint import read_checkpoint
from calm_fast.distributed import DistributedMergeError, ShardedLayout, process_group, shard_model

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def problem(folder: str):
    """(pretrained path, task paths, model, heads, data, forward, config) from the test's files."""
    saved = torch.load(os.path.join(folder, "problem.pt"), weights_only=True)
    tasks = list(saved["heads"])
    if saved["kind"] == "branch":
        model, forward = BranchNet(len(tasks)), None
        heads = {t: BranchHead(i, len(tasks)) for i, t in enumerate(tasks)}
    else:
        model = TinyViT()
        forward = lambda batch: model(batch["pixel_values"])  # noqa: E731  (through model.forward)
        heads = {t: torch.nn.Linear(32, CLASSES) for t in tasks}
    for t, head in heads.items():
        head.load_state_dict(saved["heads"][t])
    config = calm_fast.CALMConfig(**saved["config"])
    return (os.path.join(folder, "pretrained.safetensors"), {t: os.path.join(folder, f"{t}.safetensors") for t in tasks},
            model, heads, saved["data"], forward, config)


def augment(folder: str):
    """The problem's training-batch augmentation: Gaussian jitter of the given scale, or none."""
    scale = torch.load(os.path.join(folder, "problem.pt"), weights_only=True).get("jitter")
    if scale is None:
        return None
    return lambda batch, generator: batch + scale * torch.randn(batch.shape, generator=generator)


def merge(folder, output, progress_file="", seed="0"):
    """calm_fast.merge(method="calm", output=...) as every rank calls it; its report and time."""
    pretrained, finetuned, model, heads, data, forward, config = problem(folder)
    start = time.perf_counter()
    result = calm_fast.merge(pretrained, finetuned, method="calm", model=model, heads=heads, data=data,
                             forward=forward, augment=augment(folder), config=config, device="cpu", seed=int(seed),
                             progress=False, progress_file=progress_file or None, output=output, overwrite=True)
    return {"report": dataclasses.asdict(result.report), "seconds": time.perf_counter() - start}


def initial(folder):
    """Each task's initial mask (±bias logits) on the sharded model, each rank's rows and the
    whole gathered to rank 0, against the same begin_step on a whole copy in this process:
    identical, entry for entry."""
    pretrained, finetuned, model, heads, data, forward, config = problem(folder)
    base, tuned = read_checkpoint(pretrained), {t: read_checkpoint(p) for t, p in finetuned.items()}
    keys = [k for k in base if base.spec(k)[1].is_floating_point]
    cpu = torch.device("cpu")
    sharded_model = shard_model(copy.deepcopy(model), cpu)
    layout = ShardedLayout(sharded_model)
    whole = CALMMerger(base, tuned, keys, model, heads, data, forward, config, cpu, 0, None)
    sharded = CALMMerger(base, tuned, keys, sharded_model, heads, data, None, config, cpu, 0, None, layout=layout)
    found = {"checked": 0, "chosen": []}
    tasks = list(tuned)
    for merger in (whole, sharded):
        merger.load_merged(tasks[:-1], scaling=AUTHORS_SCALING)
    for task in tasks:
        want, _ = whole.begin_step(task)
        got, _ = sharded.begin_step(task)
        for key in keys:
            assert torch.equal(got[key], layout.part(key, want[key])), (task, key)  # this rank's rows
            gathered = layout.gather(key, got[key])  # and the whole, on rank 0
            assert torch.equal(gathered, want[key]) if RANK == 0 else gathered is None, (task, key)
            found["checked"] += want[key].numel()
        found["chosen"].append(int(sum((want[key] > 0).sum() for key in keys)))
    return found


def diverge(folder, output):
    """Rank 1 draws under another seed: every rank stops, naming it."""
    try:
        merge(folder, output, "", str(RANK))
    except DistributedMergeError as exc:
        return {"error": str(exc), "left": sorted(os.listdir(os.path.dirname(output)))}
    raise AssertionError("no DistributedMergeError")


def kill(folder, output):
    """Rank 1 exits in its 4th forward (FSDP's gathers inside it); rank 0's error and its time."""
    pretrained, finetuned, model, heads, data, forward, config = problem(folder)
    if RANK == 1:
        calls = [0]
        hook = lambda *args: (calls.__setitem__(0, calls[0] + 1), calls[0] > 3 and os._exit(3))  # noqa: E731
        model.register_forward_pre_hook(hook)
    start = time.perf_counter()
    try:
        calm_fast.merge(pretrained, finetuned, method="calm", model=model, heads=heads, data=data, forward=forward,
                        config=config, device="cpu", progress=False, output=output)
    except DistributedMergeError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}
    raise AssertionError("no DistributedMergeError")


def main():
    mode, store, out, *args = sys.argv[1:]
    run = {"merge": merge, "initial": initial, "diverge": diverge, "kill": kill}[mode]
    if WORLD == 1:
        found = run(*args)
    else:
        timeout = timedelta(seconds=float(os.environ.get("CALM_FAST_TEST_TIMEOUT", "60")))
        with process_group("gloo", init_method=f"file://{store}", rank=RANK, world_size=WORLD, timeout=timeout):
            found = run(*args)
            if mode == "kill":
                write_found(out, found)
                os._exit(0)  # the group lost a rank: tearing it down could wait on that rank
            dist.barrier()  # no rank tears the group down while another still uses it
        found["gloo_threads"] = gloo_threads()
    write_found(out, found)


if __name__ == "__main__":
    main()
