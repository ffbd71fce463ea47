"""calm_fast.distributed on CPU with gloo, 2 processes (tests/distributed_worker.py per rank):
the distributed select against the single-process one, data-free merges bit-identical to
calm_fast.merge(), and the errors of disagreeing, failing, killed and hung ranks."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import calm_fast
from calm_fast.checkpoint import read_checkpoint
from calm_fast.distributed import partition, shard_plan
from conftest import SESSION_SEED

from distributed_launch import finished, start_ranks

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2


def launch(mode, tmp_path, *args, **kw):
    return start_ranks(WORKER, WORLD, mode, tmp_path, *args, **kw)
METHODS = {"average": None, "task_arithmetic": calm_fast.DataFreeConfig(scaling=0.4),
           "ties": calm_fast.DataFreeConfig(density=0.3),
           "consensus": calm_fast.DataFreeConfig(tall_lambda=0.7, min_votes=2)}  # as in the worker


def _model(gen):
    """A small model of mixed dtypes (fp32, bf16, fp16) and a carried int64 counter."""
    shapes = {"embed.weight": ((64, 16), torch.float32), "blocks.0.weight": ((32, 32), torch.float32),
              "blocks.0.bias": ((32,), torch.float32), "norm.weight": ((48,), torch.bfloat16),
              "steps": ((), torch.int64), "blocks.1.weight": ((40, 24), torch.float32),
              "head.weight": ((10, 16), torch.float16), "last.bias": ((20,), torch.float32)}
    return {k: (torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.tensor(7)).to(dtype)
            for k, (shape, dtype) in shapes.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """pretrained + 3 tasks as safetensors (read lazily); their task vectors are multiples of
    1/64, so |τ| ties often. nan/ holds the same with a NaN in task0's last key (rank 1's)."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "nan").mkdir()
    pre = _model(gen)
    save_file(pre, folder / "pretrained.safetensors")
    save_file(pre, folder / "nan" / "pretrained.safetensors")
    for t in range(3):
        task = {k: (v.float() + torch.randint(-4, 5, v.shape, generator=gen) / 64).to(v.dtype)
                if v.is_floating_point() else v for k, v in pre.items()}
        save_file(task, folder / f"task{t}.safetensors")
        if t == 0:
            task = {**task, "last.bias": task["last.bias"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
        save_file(task, folder / "nan" / f"task{t}.safetensors")
    return folder


def test_partition_and_shard_plan_cover_every_key_once():
    sizes = {"a": 10, "b": 10, "c": 10, "d": 1000, "e": 5}
    assert partition(sizes, 2) == [["a", "b", "c"], ["d", "e"]]
    assert partition({"a": 4}, 3) == [[], ["a"], []]
    plan = shard_plan(partition(sizes, 2), sizes, 25)
    assert plan == [(0, "model-00001-of-00004.safetensors", ["a", "b"]), (0, "model-00002-of-00004.safetensors", ["c"]),
                    (1, "model-00003-of-00004.safetensors", ["d"]), (1, "model-00004-of-00004.safetensors", ["e"])]
    assert shard_plan([["a"], []], {"a": 4}, 100) == [(0, "model.safetensors", ["a"])]


def test_distributed_threshold_equals_single_process(tmp_path):
    """Random values, many ties, inf/NaN, an empty tensor, a rank with no tensors, k = 0..N, three
    dtypes, 64-entry chunks; an FSDP-like (parameter, offset) order; the normalized step."""
    results = launch("threshold", tmp_path, SESSION_SEED)
    for rank in range(WORLD):
        assert finished(results, rank)["checked"] > 100


def test_data_free_merges_are_bit_identical_to_one_process(inputs, tmp_path):
    results = launch("merge", tmp_path, inputs, tmp_path / "merged")
    found = [finished(results, rank) for rank in range(WORLD)]
    assert [f["gloo_threads"] for f in found] == [[]] * WORLD  # process_group() leaves none running
    seconds = [f["seconds"] for f in found]
    pretrained = str(inputs / "pretrained.safetensors")
    finetuned = {f"task{t}": str(inputs / f"task{t}.safetensors") for t in range(3)}
    for method, config in METHODS.items():
        single = calm_fast.merge(pretrained, finetuned, method=method, config=config, device="cpu", progress=False)
        outputs = [method] + (["ties-small"] if method == "ties" else [])
        for name in outputs:
            folder = tmp_path / "merged" / name
            merged = read_checkpoint(str(folder))
            assert set(merged) == set(single.state_dict), name
            for key, want in single.state_dict.items():
                got = merged[key]
                assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8),
                                                               want.view(-1).view(torch.uint8)), (name, key)
            assert (folder / "report.json").read_text() == calm_fast.report_json(single), name
    shards = sorted(os.listdir(tmp_path / "merged" / "ties-small"))
    assert len(shards) > 3 and "model.safetensors.index.json" in shards, shards
    assert not [n for n in os.listdir(tmp_path / "merged") if n.startswith(".")]  # no temporaries left
    print("distributed merge seconds per rank:", seconds)


def test_disagreeing_and_failing_ranks_stop_every_rank(inputs, tmp_path):
    results = launch("errors", tmp_path, inputs, tmp_path / "out")
    for rank in range(WORLD):
        found = finished(results, rank)
        assert "rank 1 differs from rank 0 in 'config'" in found["config"] and "scaling=0.5" in found["config"]
        assert "rank 1 differs from rank 0 in 'parameters': entry 0" in found["parameters"]
        assert "rank 1 differs from rank 0 in 'seed': 1 vs 0" in found["seed"]
        assert "k per rank {0: 5, 1: 6}" in found["k"]
        for case, step in (("nan", "TIES task vectors of task 'task0'"), ("nan_writing", "writing shards")):
            assert f"{step} failed on rank 1: ValueError: calm_fast: task 'task0': last.bias holds NaN" in found[case]
            assert "rank 0:" not in found[case], found[case]
        assert found["left_behind"] == []  # no output, no temporary folder


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_lost_rank_raises_within_the_timeout(inputs, tmp_path, mode):
    """Rank 1 exits, or stops answering, inside TIES' threshold; rank 0 raises a clear error by
    the process group's timeout (5 s) instead of waiting forever."""
    timeout = 5
    results = launch(mode, tmp_path, inputs, tmp_path / "out", timeout_s=timeout, wait_for=[0], wait_s=60)
    found = finished(results, 0)
    assert found["error"].startswith("calm_fast: rank 0: magnitude_threshold: inputs: the collective failed: "
                                     "rank 1 never got there (its last collective: TIES task vectors of task"), found
    assert found["seconds"] < timeout + 5, found
