"""One rank of the distributed tests (tests/test_distributed.py starts `world` of these).

usage: distributed_worker.py MODE STORE_FILE OUT_DIR [ARGS...], with RANK, WORLD_SIZE and
CALM_FAST_TEST_TIMEOUT (seconds, the process group's timeout) in the environment. Each rank
writes what it found to OUT_DIR/rank<r>.json; an unexpected error exits non-zero.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch

from distributed_launch import gloo_threads, write_found

from calm_fast import DataFreeConfig, reference
from calm_fast.checkpoint import read_checkpoint
from calm_fast.distributed import (DistributedMergeError, data_free, magnitude_threshold, merge_data_free,
                                   normalized_step_size, process_group, select)

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
METHODS = {"average": None, "task_arithmetic": DataFreeConfig(scaling=0.4), "ties": DataFreeConfig(density=0.3),
           "consensus": DataFreeConfig(tall_lambda=0.7, min_votes=2)}


def _inputs(folder):
    tasks = sorted(name[:-len(".safetensors")] for name in os.listdir(folder)
                   if name.startswith("task") and name.endswith(".safetensors"))
    return os.path.join(folder, "pretrained.safetensors"), {t: os.path.join(folder, f"{t}.safetensors") for t in tasks}


def _case_tensors(gen, sizes_per_rank, dtype, kind):
    """Every rank's tensors (all ranks build all of them from the same seed)."""
    out = []
    for sizes in sizes_per_rank:
        tensors = []
        for n in sizes:
            if kind == "ties":
                t = torch.randint(-3, 4, (n,), generator=gen).float()
            else:
                t = torch.randn(n, generator=gen)
                if kind == "special" and n > 3:
                    t[:3] = torch.tensor([float("inf"), float("nan"), -float("inf")])
            tensors.append(t.to(dtype))
        out.append(tensors)
    return out


def threshold(seed):
    """The distributed select against reference.magnitude_threshold over the concatenation, in
    the default (rank-major) order and in an FSDP-like order; CHUNK shrunk to cross chunks."""
    select.CHUNK = 64
    gen = torch.Generator().manual_seed(int(seed))
    layouts = {"uneven": [[1000, 0, 37], [501, 3]][:WORLD], "one rank empty": [[300, 7], []][:WORLD]}
    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for kind in ("random", "ties", "special"):
            for name, sizes in layouts.items():
                everyone = _case_tensors(gen, sizes, dtype, kind)
                flat = [t for tensors in everyone for t in tensors]
                first = sum(len(tensors) for tensors in everyone[:RANK])
                total = sum(t.numel() for t in flat)
                for k in sorted({0, 1, total // 3, total // 2, total - 1, total}):
                    thr, quota = magnitude_threshold(everyone[RANK], k)
                    want_thr, want_quota = reference.magnitude_threshold(flat, k)
                    where = f"{dtype} {kind} {name} k={k}"
                    same_bits = torch.equal(thr.view(-1).view(torch.uint8), want_thr.view(-1).view(torch.uint8))
                    assert thr.dtype == dtype and same_bits, (where, thr, want_thr)
                    assert quota.tolist() == want_quota[first:first + len(everyone[RANK])].tolist(), where
                    checked += 1
    # FSDP-like: each parameter split in contiguous flat ranges, rank r holding range r of each;
    # ties are filled in (parameter, offset) order, as one process over whole parameters fills them
    params = [torch.randint(-2, 3, (n,), generator=gen).float() for n in (50, 31, 8)]
    shards, order = [], []
    for p, full in enumerate(params):
        bounds = [full.numel() * r // WORLD for r in range(WORLD + 1)]
        shards.append(full[bounds[RANK]:bounds[RANK + 1]])
        order.append((p, bounds[RANK]))
    total = sum(p.numel() for p in params)
    for k in sorted({1, total // 4, total // 2, total - 1}):
        thr, quota = magnitude_threshold(shards, k, order=order)
        want_thr, want_quota = reference.magnitude_threshold(params, k)
        assert torch.equal(thr, want_thr)
        for shard, (p, offset), q in zip(shards, order, quota.tolist()):
            ties = torch.nonzero(params[p].abs() == want_thr).flatten()[:int(want_quota[p])]
            assert q == int(((ties >= offset) & (ties < offset + shard.numel())).sum()), (k, p)
        checked += 1
    # the normalized step: the same bits on every rank, the single-process formula
    sums = torch.rand(WORLD, generator=gen) * 10
    counts = torch.randint(1, 1000, (WORLD,), generator=gen)
    got = normalized_step_size(sums[RANK], int(counts[RANK]), 2.0)
    total_sum = sums[0]
    for r in range(1, WORLD):
        total_sum = total_sum + sums[r]
    assert got == 2.0 / (total_sum / int(counts.sum())).sqrt().item(), got
    assert normalized_step_size(torch.tensor(0.0), 0, 2.0) == 0.0
    return {"checked": checked}


def merge(inputs, output):
    """Every data-free method, into output/<method>, and TIES into output/ties-small in shards
    of at most 2 KB; timed."""
    pretrained, finetuned = _inputs(inputs)
    seconds = {}
    for method, config in METHODS.items():
        start = time.perf_counter()
        result = merge_data_free(pretrained, finetuned, method, config, os.path.join(output, method))
        seconds[method] = time.perf_counter() - start
        assert set(result.state_dict) == set(read_checkpoint(pretrained))
    merge_data_free(pretrained, finetuned, "ties", METHODS["ties"], os.path.join(output, "ties-small"),
                    max_shard_bytes=2000)
    return {"seconds": seconds}


def _expect_error(fn) -> str:
    try:
        fn()
    except DistributedMergeError as exc:
        return str(exc)
    raise AssertionError("no DistributedMergeError")


def errors(inputs, output):
    """Disagreements and a failing rank, one after the other in one process group: each raises
    on every rank, which keeps the group usable for the next."""
    pretrained, finetuned = _inputs(inputs)
    pre_sd, ft_sd = dict(read_checkpoint(pretrained)), {t: dict(read_checkpoint(p)) for t, p in finetuned.items()}
    os.makedirs(output, exist_ok=True)
    found = {}
    config = DataFreeConfig(scaling=0.3 if RANK == 0 else 0.5)
    found["config"] = _expect_error(lambda: merge_data_free(pretrained, finetuned, "task_arithmetic", config,
                                                            os.path.join(output, "config")))
    if RANK == 1:  # a model without its first parameter
        first = next(iter(pre_sd))
        pre_sd = {k: v for k, v in pre_sd.items() if k != first}
        ft_sd = {t: {k: v for k, v in sd.items() if k != first} for t, sd in ft_sd.items()}
    found["parameters"] = _expect_error(lambda: merge_data_free(pre_sd, ft_sd, "average", None,
                                                                os.path.join(output, "parameters")))
    found["seed"] = _expect_error(lambda: merge_data_free(pretrained, finetuned, "average", None,
                                                          os.path.join(output, "seed"), seed=RANK))
    found["k"] = _expect_error(lambda: magnitude_threshold([torch.ones(10)], 5 + RANK))
    nan_inputs = os.path.join(inputs, "nan")  # the last key, rank 1's, holds a NaN in task0
    pretrained, finetuned = _inputs(nan_inputs)
    found["nan"] = _expect_error(lambda: merge_data_free(pretrained, finetuned, "ties", METHODS["ties"],
                                                         os.path.join(output, "nan")))  # in TIES' thresholds
    found["nan_writing"] = _expect_error(lambda: merge_data_free(pretrained, finetuned, "average", None,
                                                                 os.path.join(output, "nan")))  # in rank 1's shard
    found["left_behind"] = sorted(os.listdir(output))
    return found


def lost(mode, inputs, output):
    """Rank 1 exits (`kill`) or stops answering (`hang`) in TIES' first threshold; rank 0 reports
    its error and how long it took to get it."""
    pretrained, finetuned = _inputs(inputs)
    if RANK == 1:
        def stop(*args, **kwargs):
            if mode == "kill":
                os._exit(3)
            time.sleep(600)
        data_free.magnitude_threshold = stop
    start = time.perf_counter()
    message = _expect_error(lambda: merge_data_free(pretrained, finetuned, "ties", None, os.path.join(output, "lost")))
    return {"error": message, "seconds": time.perf_counter() - start}


def main():
    mode, store, out, *args = sys.argv[1:]
    timeout = timedelta(seconds=float(os.environ.get("CALM_FAST_TEST_TIMEOUT", "20")))
    with process_group("gloo", init_method=f"file://{store}", rank=RANK, world_size=WORLD, timeout=timeout):
        if mode == "threshold":
            found = threshold(*args)
        elif mode in ("kill", "hang"):
            write_found(out, lost(mode, *args))
            os._exit(0)  # the group lost a rank: tearing it down could wait on that rank
        else:
            found = {"merge": merge, "errors": errors}[mode](*args)
    found["gloo_threads"] = gloo_threads()
    write_found(out, found)


if __name__ == "__main__":
    main()
