"""CALM on FSDP2 over 2 CPU processes (gloo; tests/distributed_calm_worker.py per rank) against
the same merge in one process (the worker with WORLD_SIZE=1, also one thread): the same initial
masks entry for entry, the same pseudo-labels, order and agreement, masks that differ only
where a logit ends within rounding of 0, the same merged-model accuracy; resume, and the errors
of a diverging and of a killed rank."""
import os
from pathlib import Path

import pytest
import torch
from distributed_launch import finished, start_ranks
from merge_fixtures import BranchNet, TinyViT, differing_mask_bits, make_tasks, make_vit_tasks
from safetensors.torch import save_file

from calm_fast import maskfile
from calm_fast.checkpoint import read_checkpoint

WORKER = Path(__file__).with_name("distributed_calm_worker.py")
# Masks of 2 ranks may differ from one process's where the fp32 gradient, summed in another
# order by FSDP's reduce-scatter, moves a logit across 0: measured 0 bits on these problems;
# the bound allows a few per million.
MAX_DIFFERING_MASK_FRACTION = 1e-5


def _write_problem(folder, kind, pretrained, finetuned, heads, data, config, **extra):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, folder / "pretrained.safetensors")
    for task, model in finetuned.items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{task}.safetensors")
    torch.save({"kind": kind, "heads": {t: h.state_dict() for t, h in heads.items()}, "data": data,
                "config": config, **extra}, folder / "problem.pt")
    return folder


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """Branch tasks with task vectors on a grid of 1/256 (|τ| ties at the threshold), the same
    with the held-out stopping rule, augmented training batches and the initial λ from trial
    loops, and a tiny ViT whose 1-row
    parameters (cls, pos) leave rank 1 an empty shard."""
    root = tmp_path_factory.mktemp("problems")
    pre, ft, heads, data = make_tasks(num_tasks=3, examples=128)
    with torch.no_grad():
        for model in ft.values():
            for p, p0 in zip(model.parameters(), pre.parameters()):
                p.copy_(p0 + torch.round((p - p0) * 256) / 256)
    branch = _write_problem(root / "branch", "branch", pre, ft, heads, data,
                            {"updates": 8, "batch_size": 48, "num_sequential": 2, "sparsity": 0.05})
    checked = _write_problem(root / "checked", "branch", pre, ft, heads, data,
                             {"updates": 8, "batch_size": 48, "num_sequential": 2, "sparsity": 0.05,
                              "holdout": 0.25, "check_every": 3, "init_scaling": "trial"}, jitter=0.05)
    pre, ft, heads, batches = make_vit_tasks(num_tasks=3, examples=96)
    pools = {t: {"pixel_values": torch.cat([b["pixel_values"] for b, _ in batches[t]])} for t in ft}
    vit = _write_problem(root / "vit", "vit", pre, ft, heads, pools,
                         {"updates": 6, "batch_size": 32, "num_sequential": 2, "score_batch_size": 40,
                          "sparsity": 0.02})
    return {"branch": branch, "checked": checked, "vit": vit}


def _merge(problem, tmp_path, world, name, *args):
    output = tmp_path / name
    results = start_ranks(WORKER, world, "merge", tmp_path, problem, output, *args, timeout_s=60, name=name)
    found = [finished(results, rank) for rank in range(world)]
    if world > 1:  # FSDP's mesh and DTensor's caches no longer hold the destroyed group
        assert [f["gloo_threads"] for f in found] == [[]] * world
    return output, found[0]["report"]


def _accuracy(kind, state, problem) -> float:
    """Agreement of the merged model with each task's fine-tuned model, averaged over tasks."""
    saved = torch.load(problem / "problem.pt", weights_only=True)
    scores = []
    for task, head_state in saved["heads"].items():
        models = []
        for weights in (state, read_checkpoint(str(problem / f"{task}.safetensors"))):
            model = BranchNet(len(saved["heads"])) if kind == "branch" else TinyViT()
            model.load_state_dict(dict(weights))
            models.append(model.eval())
        head = _head(kind, saved, task, head_state)
        x = saved["data"][task] if kind == "branch" else saved["data"][task]["pixel_values"]
        with torch.no_grad():
            merged, own = (head(m(x)).argmax(1) for m in models)
        scores.append(float((merged == own).float().mean()))
    return sum(scores) / len(scores)


def _head(kind, saved, task, state):
    from merge_fixtures import CLASSES, BranchHead

    tasks = list(saved["heads"])
    head = BranchHead(tasks.index(task), len(tasks)) if kind == "branch" else torch.nn.Linear(32, CLASSES)
    head.load_state_dict(state)
    return head


@pytest.mark.parametrize("kind", ["branch", "vit"])
def test_initial_masks_equal_one_process_entry_for_entry(problems, tmp_path, kind):
    results = start_ranks(WORKER, 2, "initial", tmp_path, problems[kind], timeout_s=60)
    found = [finished(results, rank) for rank in range(2)]
    assert found[0] == found[1] and found[0]["checked"] > 0 and min(found[0]["chosen"]) > 0


@pytest.mark.parametrize("name", ["branch", "checked", "vit"])
def test_two_ranks_merge_as_one_process_does(problems, tmp_path, name):
    problem, kind = problems[name], "vit" if name == "vit" else "branch"
    one, single = _merge(problem, tmp_path, 1, "one")
    two, sharded = _merge(problem, tmp_path, 2, "two")
    assert bool(single["checks"]) == bool(single["trial_agreement"]) == (name == "checked")
    for field in ("initial", "sequential", "pseudo_labels", "pool_sizes", "agreement", "init_scaling",
                  "scaling_agreement", "trial_agreement", "no_grad_keys", "checks", "best_update"):
        assert sharded[field] == single[field], field
    # the ranks sum gradients in another order: step sizes measured up to 5.2e-4 apart (branch, the
    # auto λ 0.5 of these problems) while every mask bit agrees
    for field in ("step_sizes", "losses"):
        for task, values in single[field].items():
            assert sharded[field][task] == pytest.approx(values, rel=1e-3), (field, task)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == ["masks.safetensors", "model.safetensors",
                                                                  "report.json"]
    masks = [maskfile.read(str(folder / "masks.safetensors"))[0] for folder in (one, two)]
    differing, total = differing_mask_bits(*masks)
    assert differing <= MAX_DIFFERING_MASK_FRACTION * total, (differing, total)
    print(f"{name}: {differing} of {total} mask bits differ between 1 and 2 processes")
    weights = [read_checkpoint(str(folder)) for folder in (one, two)]
    assert list(weights[0]) == list(weights[1])
    for key in weights[0]:
        assert weights[1][key].dtype == weights[0][key].dtype
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-5)
    assert _accuracy(kind, weights[1], problem) == _accuracy(kind, weights[0], problem)


def test_resume_under_the_same_world_size_and_not_another(problems, tmp_path):
    problem, progress = problems["branch"], tmp_path / "progress.safetensors"
    first, report = _merge(problem, tmp_path, 2, "first", progress)
    assert progress.exists()  # every step saved; merge() leaves it for the caller (the CLI removes it)
    again, resumed = _merge(problem, tmp_path, 2, "again", progress)
    assert resumed["seconds"].get("pseudo_labels") == report["seconds"].get("pseudo_labels")  # restored, not rerun
    masks = [maskfile.read(str(folder / "masks.safetensors"))[0] for folder in (first, again)]
    assert all(torch.equal(masks[1].bits[t][k], bits) for t, step in masks[0].bits.items() for k, bits in step.items())
    results = start_ranks(WORKER, 1, "merge", tmp_path, problem, tmp_path / "alone", progress, name="alone")
    code, output, _ = results[0]
    assert code != 0 and "was written by 2 process(es), this run has 1: resume it with the same world size" in output


def test_a_diverging_rank_stops_every_rank(problems, tmp_path):
    (tmp_path / "out").mkdir()
    results = start_ranks(WORKER, 2, "diverge", tmp_path, problems["branch"], tmp_path / "out" / "merged",
                          timeout_s=60)
    for rank in range(2):
        found = finished(results, rank)
        assert "rank 1 differs from rank 0 in 'seed': 1 vs 0" in found["error"], found
        assert found["left"] == [], found  # no output, no temporary folder


def test_a_killed_rank_stops_the_others_within_the_timeout(problems, tmp_path):
    timeout = 5
    results = start_ranks(WORKER, 2, "kill", tmp_path, problems["branch"], tmp_path / "merged", timeout_s=timeout,
                          wait_for=[0], wait_s=90)
    found = finished(results, 0)
    assert found["error"].startswith("calm_fast: rank 0: CALM (FSDP's forward or backward): the collective failed"), found
    assert found["seconds"] < timeout + 30, found
