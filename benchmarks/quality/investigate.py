"""Ablations behind benchmarks/results/quality_findings.md: what limits CALM on this benchmark.

Runs CALM variants (step size, loop length, which tasks go sequential, λ of the initial group,
regularizer, pseudo-label selection, unlabeled data from the test distribution but never evaluated)
and λ sweeps of the data-free baselines on one size's
cached fine-tuned models; every finished run is appended to the output JSON at once, so an
interrupted sweep keeps what it measured.

    python -m benchmarks.quality.investigate --size ci --groups step order lambda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import calm_fast
import torch
from calm_fast.calm.config import AUTHORS_SCALING

from . import recipes
from .data import random_shift
from .run import RESULTS, Method, calm_summary, merge, prepare, pseudo_label_quality, summarize

TASK_ORDER = ("cifar10", "gtsrb", "mnist", "fashion_mnist")


GENERALIZE_UPDATES = 100  # issue 16's rows: the authors' update count, the benchmark's batches


def generalize_variants(budget: recipes.CALMBudget) -> list[tuple]:
    """What might close the gap between held-out and transductive pools (issue 16): each
    candidate on the held-out pool, and the plain loop on the test pool (the transductive mark)."""
    plain = dict(updates=GENERALIZE_UPDATES)
    shift = {"augment": random_shift}
    rows = [("augmented: random shift ±3 px", plain, "heldout", shift),
            ("larger pool: + fine-tuning inputs", plain, "heldout+train"),
            ("larger pool: + fine-tuning inputs", dict(updates=3 * GENERALIZE_UPDATES), "heldout+train"),
            ("stopping rule: holdout 0.2, best check of 10", dict(plain, holdout=0.2), "heldout"),
            ("fewer, larger batches of 256", dict(updates=GENERALIZE_UPDATES // 4, batch_size=4 * budget.batch_size),
             "heldout"),
            ("density: true L1, l1 10", dict(plain, reg="l1", l1=10.0), "heldout"),
            ("order auto", dict(plain, order="auto"), "heldout"),
            ("plain loop", plain, "heldout"),
            ("3 sequential (auto)", dict(plain, order="auto", num_sequential=3), "heldout"),
            ("plain loop", plain, "test"),
            ("initial λ 1.0", dict(plain, init_scaling=1.0), "heldout"),
            ("initial λ 0.6", dict(plain, init_scaling=0.6), "heldout"),
            ("initial λ 1.0", dict(plain, init_scaling=1.0), "test"),
            ("initial λ auto", dict(plain, init_scaling="auto"), "heldout"),
            ("initial λ auto", dict(plain, init_scaling="auto"), "test"),
            ("initial λ auto, larger pool", dict(plain, init_scaling="auto"), "heldout+train"),
            ("initial λ 1.0, larger pool", dict(plain, init_scaling=1.0), "heldout+train"),
            ("initial λ trial", dict(plain, init_scaling="trial"), "heldout"),
            ("initial λ 1.2", dict(plain, init_scaling=1.2), "heldout"),
            ("initial λ trial", dict(plain, init_scaling="trial"), "test"),
            ("initial λ 1.5", dict(plain, init_scaling=1.5), "heldout"),
            ("3 sequential (auto), initial λ 1.0", dict(plain, order="auto", num_sequential=3, init_scaling=1.0),
             "heldout")]
    return [(f"{overrides['updates']} updates, {name}", overrides, *rest) for name, overrides, *rest in rows]


def calm_variants(budget: recipes.CALMBudget) -> dict[str, list[tuple]]:
    """group -> [(name, CALMConfig overrides, unlabeled pool[, merge() keyword arguments])]."""
    return {
        "step": [("lr 0.3 (normalized)", dict(lr=0.3), "test"), ("lr 3 (normalized)", dict(lr=3.0), "test"),
                 ("authors' lr 1e7", dict(step="authors"), "test"),
                 ("authors' lr 1e7, mean", dict(step="authors", accumulate="mean"), "test")],
        "loop": [("3x updates", dict(updates=3 * budget.updates), "test"),
                 ("100 updates (the authors' count)", dict(updates=100), "test")],
        "order": [("sequential = cifar10, gtsrb", dict(initial=("mnist", "fashion_mnist"),
                                                        sequential=("cifar10", "gtsrb")), "test"),
                  ("sequential = gtsrb, cifar10", dict(initial=("mnist", "fashion_mnist"),
                                                        sequential=("gtsrb", "cifar10")), "test"),
                  ("3 sequential (auto)", dict(order="auto", num_sequential=3), "test"),
                  ("1 sequential (auto)", dict(order="auto", num_sequential=1), "test")],
        "lambda": [("initial λ 0.5", dict(init_scaling=0.5), "test"), ("initial λ 1.0", dict(init_scaling=1.0), "test")],
        "reg": [("reg l1", dict(reg="l1"), "test"), ("reg none", dict(reg="none"), "test")],
        "labels": [("ratio 1.0 (no EMS filter)", dict(ratio=1.0), "test"),
                   ("plain EMS", dict(balanced=False), "test")],
        "honest": [("held-out, 3x updates", dict(updates=3 * budget.updates), "heldout"),
                   ("held-out, 100 updates", dict(updates=100), "heldout")],
        "generalize": generalize_variants(budget),
        "initial_lambda": [(f"held-out, 2 sequential, initial λ {lam}", dict(init_scaling=lam), "heldout")
                           for lam in (0.3, 0.5, 0.7, 1.0, 1.5)],
        # does the pool's own held-out agreement after the loop rank the initial λ as the test sets do?
        "lambda_checks": [(f"{updates} updates, holdout 0.2, initial λ {lam}",
                           dict(updates=updates, holdout=0.2, init_scaling=lam), "heldout")
                          for updates in (GENERALIZE_UPDATES, GENERALIZE_UPDATES // 4) for lam in (0.6, 1.0, 0.8, 1.2)],
    }


@torch.no_grad()
def magnitude_mask_merge(pretrained: dict, finetuned: dict, initial, sequential, densities: dict,
                         scaling: float = 0.3) -> dict:
    """CALM's framework with data-free masks: θ0 + λ Σ_initial τ, then for each sequential task
    j, replace the merged values by θj on the top `densities[j]` fraction of |θj − merged| over
    the whole model (the same density CALM's learned mask had). A control for what the learned,
    consensus-aware mask adds over picking the largest disagreements."""
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    current = {k: pretrained[k].float() + scaling * sum(finetuned[t][k].float() - pretrained[k].float()
                                                          for t in initial) for k in keys}
    for task in sequential:
        deltas = {k: finetuned[task][k].float() - current[k] for k in keys}
        k_count = int(densities[task] * sum(d.numel() for d in deltas.values()))
        threshold, _ = calm_fast.ops.magnitude_threshold([d.abs().contiguous() for d in deltas.values()], k_count)
        for k in keys:
            current[k] = torch.where(deltas[k].abs() >= threshold, finetuned[task][k].float(), current[k])
    return {k: current[k].to(v.dtype) if k in current else v for k, v in pretrained.items()}


POOL_SUFFIX = {"test": "", "heldout": " [held-out]", "heldout+train": " [held-out + fine-tuning inputs]"}


def record(runs: list, row: dict, out: Path, seconds: float | None = None) -> None:
    """Appends a finished run and rewrites the output JSON at once (an interrupted sweep keeps it)."""
    row.setdefault("command", "python -m benchmarks.quality.investigate " + " ".join(sys.argv[1:]))
    runs.append(row)
    out.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"{row['name']:40s} avg {row['average']:.3f} norm {row['normalized_average']:.3f} "
          + " ".join(f"{t[:5]} {a:.3f}" for t, a in row["accuracy"].items())
          + ("" if seconds is None else f" ({seconds:.0f}s)"), flush=True)


def inductive_control(setup, loop: dict, done: set, out: Path, runs: list) -> None:
    """Is the honest setting's gap transduction or the held-out pool's distribution? Each test
    split is cut in two fixed random halves A and B; CALM (3x updates) gets B's inputs
    (transductive) or A's (inductive: same distribution, never evaluated), and both are evaluated
    on B, normalized by the individual models' accuracy on B."""
    halves = {}
    for i, (task, split) in enumerate(setup.tests.items()):
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(300 + i))
        halves[task] = (split.subset(order[: len(split) // 2].numpy()), split.subset(order[len(split) // 2:].numpy()))
    on_b = replace(setup, tests={t: h[1] for t, h in halves.items()}, heldout={t: h[0] for t, h in halves.items()})
    individual = {t: q["accuracy_all"] for t, q in pseudo_label_quality(on_b, pools=("test",))["test"].items()}
    config = calm_fast.CALMConfig(**{**loop, "updates": 3 * loop["updates"]})
    for name, pool in (("test split B: transductive on B, 3x updates", "test"),
                       ("test split B: inductive from half A, 3x updates", "heldout")):
        if name in done:
            continue
        state, result, seconds = merge(on_b, Method("calm", name, "calm", config, unlabeled=pool))
        record(runs, {"name": name, "group": "inductive", **summarize(on_b.evaluate(state), individual),
                      "individual_on_b": individual, "merge_seconds": seconds, "calm": calm_summary(result)},
               out, seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(recipes.RECIPES), default="ci")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--groups", nargs="*", default=["baselines", "step", "loop", "order", "lambda"])
    parser.add_argument("--lambdas", nargs="*", type=float, default=[0.2, 0.5, 0.7, 1.0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    recipe = recipes.get(args.size)
    out = args.out or RESULTS / f"quality_{args.size}_ablations.json"
    runs = json.loads(out.read_text()) if out.exists() else []
    done = {r["name"] for r in runs}
    setup = prepare(recipe, args.device)
    pseudo = pseudo_label_quality(setup, pools=("test",))
    individual = {t: pseudo["test"][t]["accuracy_all"] for t in TASK_ORDER}
    variants = calm_variants(recipe.calm)
    budget = recipe.calm
    # the authors' λ unless a row sets one: the rows measured before init_scaling="auto" became the default
    loop = dict(updates=budget.updates, batches_per_task=budget.batches_per_task, batch_size=budget.batch_size,
                init_scaling=AUTHORS_SCALING)
    todo = []
    if "baselines" in args.groups:
        for lam in args.lambdas:
            for method in ("task_arithmetic", "ties"):
                todo.append((f"{method} λ {lam}", Method(method, method, method, calm_fast.DataFreeConfig(scaling=lam))))
    for group in args.groups:
        for name, overrides, pool, *kwargs in variants.get(group, []):
            config = calm_fast.CALMConfig(**{**loop, **overrides})
            todo.append((f"calm: {name}{POOL_SUFFIX[pool]}",
                         Method("calm", name, "calm", config, unlabeled=pool, kwargs=kwargs[0] if kwargs else {})))
    if "controls" in args.groups:  # data-free masks at the densities of the default CALM run
        default = json.loads((RESULTS / f"quality_{args.size}.json").read_text())
        calm_row = next(r for r in default["rows"] if r["name"] == "calm")["calm"]
        for name, density in (("magnitude masks at CALM's densities", calm_row["mask_density"]),
                              ("magnitude masks at 2x CALM's densities",
                               {t: 2 * d for t, d in calm_row["mask_density"].items()}),
                              ("magnitude masks at 1/2 CALM's densities",
                               {t: d / 2 for t, d in calm_row["mask_density"].items()})):
            if name in done:
                continue
            start = time.perf_counter()
            state = magnitude_mask_merge(setup.pretrained, setup.finetuned, calm_row["initial"],
                                         calm_row["sequential"], density)
            seconds = time.perf_counter() - start
            row = {"name": name, "group": "control", **summarize(setup.evaluate(state), individual),
                   "merge_seconds": seconds, "densities": density,
                   "initial": calm_row["initial"], "sequential": calm_row["sequential"]}
            record(runs, row, out)
    if "inductive" in args.groups:
        inductive_control(setup, loop, done, out, runs)
    for name, spec in todo:
        if name in done:
            continue
        start = time.perf_counter()
        state, result, seconds = merge(setup, spec)
        row = {"name": name, "group": spec.method, **summarize(setup.evaluate(state), individual),
               "merge_seconds": seconds, "wall_seconds": time.perf_counter() - start}
        if result is not None and result.report is not None:
            row["calm"] = calm_summary(result)
            row["config"] = {k: str(v) for k, v in result.config.__dict__.items()}
            row["pool"] = spec.unlabeled
            row["merge_kwargs"] = {k: getattr(v, "__name__", str(v)) for k, v in spec.kwargs.items()}
        record(runs, row, out, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
