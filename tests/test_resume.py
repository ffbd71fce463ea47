"""Mask files and resumable CALM runs: replay without data, an interrupted run resumes to the
uninterrupted result bit for bit, and files that do not belong are refused."""
import pytest
import torch
from safetensors.torch import save_file

import calm_fast
from calm_fast import CALMConfig, maskfile
from calm_fast.calm import CALMMerger
from calm_fast.checkpoint import CheckpointError
from merge_fixtures import make_tasks

CONFIG = CALMConfig(updates=6, batch_size=32, sequential=("task1", "task2", "task3"))


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(num_tasks=4)


def _merge(tasks, config=CONFIG, **kw):
    pre, ft, heads, data = tasks
    return calm_fast.merge(pre, ft, method="calm", heads=heads, data=data, config=config, device="cpu",
                           progress=False, **kw)


def _same(a, b):
    assert list(a.state_dict) == list(b.state_dict)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.masks.sequential == b.masks.sequential
    for task in a.masks.sequential:
        assert all(torch.equal(a.masks.bits[task][k], b.masks.bits[task][k]) for k in a.masks.bits[task])
    assert a.report.losses == b.report.losses and a.report.mask_density == b.report.mask_density


def _counting_steps(monkeypatch, fail_at=None):
    calls, failed = [], []
    original = CALMMerger.optimize_step

    def step(self, task, seen):
        calls.append(task)
        if len(calls) == fail_at and not failed:
            failed.append(task)
            raise RuntimeError("simulated interruption")
        return original(self, task, seen)

    monkeypatch.setattr(CALMMerger, "optimize_step", step)
    return calls


def test_interrupted_run_resumes_to_the_uninterrupted_result(tasks, tmp_path, monkeypatch):
    reference = _merge(tasks)
    progress = tmp_path / "run.progress.safetensors"
    calls = _counting_steps(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _merge(tasks, progress_file=progress)
    saved, resume, _ = maskfile.read(str(progress))
    assert saved.sequential == ["task1"] and resume["planned"] == ["task1", "task2", "task3"]
    calls.clear()
    resumed = _merge(tasks, progress_file=progress)
    assert calls == ["task2", "task3"]  # step 1 is not redone
    _same(reference, resumed)
    calls.clear()
    again = _merge(tasks, progress_file=progress)  # a finished progress file: nothing left to do
    assert calls == []
    _same(reference, again)


def test_progress_file_of_another_run_is_refused(tasks, tmp_path):
    progress = tmp_path / "p.safetensors"
    _merge(tasks, progress_file=progress)
    with pytest.raises(ValueError, match=r"belongs to another run \(config differ"):
        _merge(tasks, config=CALMConfig(updates=7, batch_size=32, sequential=("task1", "task2", "task3")),
               progress_file=progress)
    with pytest.raises(ValueError, match=r"belongs to another run \(seed differ"):
        _merge(tasks, progress_file=progress, seed=1)


def test_mask_file_holds_what_replay_needs(tasks, tmp_path):
    pre, ft, heads, data = tasks
    result = _merge(tasks)
    path = tmp_path / "masks.safetensors"
    result.save_masks(path)
    masks, resume, _ = maskfile.read(str(path))
    assert resume is None and masks.version == calm_fast.__version__
    assert masks.tasks == list(ft) and masks.sequential == ["task1", "task2", "task3"]
    assert masks.config["updates"] == 6 and masks.config["delta_dtype"] == "float32"
    assert set(masks.parameters) == {k for k, v in pre.state_dict().items() if v.is_floating_point()}
    rebuilt = calm_fast.replay(pre, ft, path, device="cpu")
    assert all(torch.equal(rebuilt[k], result.state_dict[k]) for k in result.state_dict)


def test_replay_refuses_masks_that_do_not_fit(tasks, tmp_path):
    pre, ft, heads, data = tasks
    path = tmp_path / "masks.safetensors"
    _merge(tasks).save_masks(path)
    with pytest.raises(ValueError, match=r"made with task\(s\) \['task3'\] that are not given"):
        calm_fast.replay(pre, {k: v for k, v in ft.items() if k != "task3"}, path, device="cpu")
    other_pre, other_ft, _, _ = make_tasks(num_tasks=3)
    with pytest.raises(KeyError, match="do not fit these weights"):
        calm_fast.replay(other_pre, {**other_ft, "task3": other_ft["task0"]}, path, device="cpu")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a calm_fast mask file"):
        calm_fast.replay(pre, ft, tmp_path / "plain.safetensors", device="cpu")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="not a readable mask file"):
        calm_fast.replay(pre, ft, tmp_path / "cut.safetensors", device="cpu")
