"""What helps masks generalize beyond their unlabeled pool: the initial group's λ chosen from
its pseudo-labels (CALMConfig.init_scaling="auto") or from short trial loops ("trial"), the held-out stopping rule
(CALMConfig.holdout / check_every / patience) and training-batch augmentation (merge(augment=)).
Their effect on accuracy is measured in benchmarks/quality (tests/test_quality.py holds it);
here: that they do what they say, deterministically, and change nothing when unused."""
import pytest
import torch

import calm_fast
from calm_fast import CALMConfig, ops
from calm_fast.calm import labels, mask
from calm_fast.calm.config import SCALING_CANDIDATES, TRIAL_FACTORS
from merge_fixtures import make_tasks

CONFIG = dict(updates=6, batch_size=32, sequential=("task2", "task3"))


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(num_tasks=4)


def _merge(tasks, augment=None, progress_file=None, **cfg):
    pre, ft, heads, data = tasks
    return calm_fast.merge(pre, ft, method="calm", heads=heads, data=data, config=CALMConfig(**{**CONFIG, **cfg}),
                           augment=augment, device="cpu", progress=False, progress_file=progress_file)


def _same(a, b):
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    for task in a.masks.sequential:
        assert all(torch.equal(a.masks.bits[task][k], b.masks.bits[task][k]) for k in a.masks.bits[task])


def test_split_holdout_sets_aside_a_fraction_of_each_class():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    train, check = labels.split_holdout("t", y, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.sort(torch.cat([train, check])).values, torch.arange(len(y)))
    assert [int((y[check] == c).sum()) for c in range(3)] == [3, 2, 0]  # floor(n_c · 0.3)
    again = labels.split_holdout("t", y, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], check)
    other = labels.split_holdout("t", y, 0.3, torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], check)
    train, check = labels.split_holdout("t", y, 0.0, torch.Generator())
    assert torch.equal(train, torch.arange(len(y))) and len(check) == 0
    with pytest.raises(ValueError, match="task 't': holdout=0.1 of 3 pseudo-labels sets 0 aside"):
        labels.split_holdout("t", torch.tensor([0, 1, 2]), 0.1, torch.Generator())


def test_best_masks_keeps_the_first_best_check_and_stops_after_patience():
    logits = {"w": torch.tensor([3.0, -2.0, 0.5, -0.1, 4.0, -4.0, 1.0, 2.0, -3.0])}
    best = mask.BestMasks(patience=3)
    assert not best.offer(0, 0.5, logits)
    first = logits["w"].clone()
    logits["w"].neg_()
    assert not best.offer(10, 0.5, logits)  # a tie keeps the earlier masks
    assert not best.offer(20, 0.4, logits)
    assert best.offer(30, 0.5, logits)  # the third check in a row without a better agreement
    assert best.update == 0 and best.history == [[0, 0.5], [10, 0.5], [20, 0.4], [30, 0.5]]
    best.restore(logits, 5.0)
    assert torch.equal(logits["w"], torch.where(first > 0, 5.0, -5.0))
    assert torch.equal(ops.unpack_mask(best.bits["w"], 9), first > 0)


def test_holdout_keeps_the_masks_of_the_best_check(tasks):
    """Checks at 0, 2, 4, 6; the masks returned are those at the best check, i.e. what a run
    stopped at that update gives (the batches drawn up to it are the same)."""
    full = _merge(tasks, holdout=0.25, check_every=2)
    rep = full.report
    for task in ("task2", "task3"):
        history = rep.checks[task]
        assert [u for u, _ in history] == [0, 2, 4, 6]
        agreements = [a for _, a in history]
        assert rep.best_update[task] == history[agreements.index(max(agreements))][0]
        assert len(rep.losses[task]) == 6
    first = rep.best_update["task2"]
    assert first > 0, rep.checks  # this problem improves from its initial mask
    stopped = _merge(tasks, holdout=0.25, check_every=100, updates=first)  # checks at 0 and `first`
    assert all(torch.equal(stopped.masks.bits["task2"][k], full.masks.bits["task2"][k])
               for k in full.masks.bits["task2"])


def test_patience_stops_a_step_early(tasks):
    result = _merge(tasks, holdout=0.25, check_every=1, patience=1, updates=30)
    for task in ("task2", "task3"):
        history = result.report.checks[task]
        ran = len(result.report.losses[task])
        assert ran == history[-1][0] < 30  # stopped at the first check that did not improve
        assert history[-1][1] <= history[-2][1]
        assert all(b[1] > a[1] for a, b in zip(history[:-2], history[1:-1]))


def test_holdout_zero_and_an_augment_that_draws_nothing_change_nothing(tasks):
    plain = _merge(tasks)
    assert plain.report.checks == {} and plain.report.best_update == {}
    _same(plain, _merge(tasks, augment=lambda batch, generator: batch))


def test_augment_sees_training_batches_only_and_draws_from_the_seeded_generator(tasks):
    seen = []

    def jitter(batch, generator):
        seen.append(len(batch))
        return batch + 0.1 * torch.randn(batch.shape, generator=generator)

    a = _merge(tasks, augment=jitter)
    # 6 updates x 2 batches of 32 per seen task: 3 tasks for task2's step, 4 for task3's
    assert seen == [32] * (2 * (6 * 3 + 6 * 4))
    b = _merge(tasks, augment=jitter)
    _same(a, b)
    plain = _merge(tasks)
    assert not all(torch.equal(a.masks.bits[t][k], plain.masks.bits[t][k])
                   for t in a.masks.sequential for k in a.masks.bits[t])


def _jitter(batch, generator):
    return batch + 0.1 * torch.randn(batch.shape, generator=generator)


@pytest.mark.parametrize("options", [dict(holdout=0.25, check_every=2, augment=_jitter), dict(init_scaling="auto"),
                                     dict(init_scaling="trial", trial_updates=2)],
                         ids=["holdout+augment", "auto-scaling", "trial-scaling"])
def test_resume_gives_the_uninterrupted_result(tasks, tmp_path, monkeypatch, options):
    from calm_fast.calm import CALMMerger

    reference = _merge(tasks, **options)
    original, calls = CALMMerger.optimize_step, []

    def interrupted(self, task, seen):
        calls.extend([task] if self.step_label == "masking" else [])  # not the trial loops' steps
        if len(calls) == 2:
            raise RuntimeError("simulated interruption")
        return original(self, task, seen)

    progress = tmp_path / "p.safetensors"
    monkeypatch.setattr(CALMMerger, "optimize_step", interrupted)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _merge(tasks, progress_file=progress, **options)
    monkeypatch.setattr(CALMMerger, "optimize_step", original)
    resumed = _merge(tasks, progress_file=progress, **options)
    _same(reference, resumed)
    assert resumed.report.checks == reference.report.checks
    assert resumed.report.init_scaling == reference.report.init_scaling
    assert resumed.report.trial_agreement == reference.report.trial_agreement


def test_auto_scaling_picks_the_best_agreeing_candidate_and_runs_as_that_lambda(tasks, tmp_path):
    auto = _merge(tasks, init_scaling="auto")
    rep = auto.report
    assert [lam for lam, _ in rep.scaling_agreement] == list(SCALING_CANDIDATES)
    best = max(score for _, score in rep.scaling_agreement)
    assert rep.init_scaling == next(lam for lam, score in rep.scaling_agreement if score == best)
    # each initial task owns a branch here, so full task vectors (λ 1) keep it whole and
    # the authors' 0.3 does not
    assert rep.init_scaling >= 0.6 and best > dict(rep.scaling_agreement)[0.3], rep.scaling_agreement
    fixed = _merge(tasks, init_scaling=rep.init_scaling)
    _same(auto, fixed)
    assert fixed.report.scaling_agreement == [] and fixed.report.init_scaling == rep.init_scaling
    auto.save_masks(tmp_path / "masks.safetensors")
    replayed = calm_fast.replay(tasks[0], tasks[1], tmp_path / "masks.safetensors", device="cpu")
    assert all(torch.equal(replayed[k], auto.state_dict[k]) for k in replayed)


def test_trial_scaling_keeps_the_best_trial_and_runs_as_that_lambda(tasks):
    trial = _merge(tasks, init_scaling="trial", trial_updates=3)
    rep = trial.report
    auto = max(rep.scaling_agreement, key=lambda pair: pair[1])[0]  # what init_scaling="auto" keeps
    assert [lam for lam, _ in rep.trial_agreement] == sorted({round(auto * f, 4) for f in TRIAL_FACTORS})
    best = max(score for _, score in rep.trial_agreement)
    assert rep.init_scaling == next(lam for lam, score in rep.trial_agreement if score == best)
    assert 0.0 < best <= 1.0 and rep.seconds["scaling"] > 0
    assert rep.step_sizes.keys() == rep.losses.keys() == {"task2", "task3"}
    assert all(len(sizes) == CONFIG["updates"] for sizes in rep.step_sizes.values())  # the trials' are not kept
    fixed = _merge(tasks, init_scaling=rep.init_scaling)
    _same(trial, fixed)  # the trials touch neither the run's generator nor its training rows
    assert fixed.report.trial_agreement == [] and fixed.report.init_scaling == rep.init_scaling


def test_trial_scaling_needs_pseudo_labels_to_check_on(tasks):
    pre, ft, heads, data = tasks
    few = {t: d[:12] for t, d in data.items()}  # 1 to 3 pseudo-labels per class: none set aside
    with pytest.raises(ValueError, match='init_scaling="trial" checks its trials on that fraction'):
        calm_fast.merge(pre, ft, method="calm", heads=heads, data=few, device="cpu", progress=False,
                        config=CALMConfig(**{**CONFIG, "init_scaling": "trial", "batch_size": 4}))


@pytest.mark.parametrize("field, value, allowed", [("holdout", 1.0, r"in \[0, 1\)"), ("holdout", -0.1, r"in \[0, 1\)"),
                                                   ("patience", 0, "None or >= 1"), ("check_every", 0, ">= 1"),
                                                   ("trial_updates", 0, "None or >= 1"),
                                                   ("init_scaling", "best", r"> 0 or one of \('auto', 'trial'\)"),
                                                   ("init_scaling", 0.0, r"> 0 or one of \('auto', 'trial'\)")])
def test_bad_stopping_rule_settings_are_refused(field, value, allowed):
    with pytest.raises(ValueError, match=f"CALMConfig.{field} must be {allowed}"):
        CALMConfig(**{field: value}).validate()
