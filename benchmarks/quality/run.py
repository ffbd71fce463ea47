"""Merging quality on real weights and real data: EfficientNet-Lite0 (ImageNet) fine-tuned on
CIFAR-10, GTSRB, MNIST and Fashion-MNIST, merged with every method, evaluated on held-out tests.

    python scripts/fetch_quality_data.py            # once: weights and data into the cache
    python -m benchmarks.quality.run --size ci       # 2 CPU cores, a few minutes
    python -m benchmarks.quality.run --size full --device cuda

Writes benchmarks/results/quality_<size>.json, .md and .png (per-task and average accuracy,
accuracy normalized by the individual fine-tuned models, merge wall time per method).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import calm_fast
from calm_fast import sampling
from calm_fast.calm.config import AUTHORS_SCALING

from .. import harness
from . import recipes
from .data import REPO, TASKS, MissingSource, load_task, subsample
from .evaluate import accuracy
from .finetune import fine_tuned, training_split
from .model import features, load_backbone, make_forward
from .report import RESULTS, write

UNLABELED = {"test": "test inputs (transductive)", "heldout": "held-out split",
             "heldout+train": "held-out split + fine-tuning inputs"}


@dataclass
class Method:
    name: str
    label: str
    method: str  # calm_fast.merge(method=...) or "pretrained"
    config: object = None
    unlabeled: str = "test"  # CALM's data: a key of UNLABELED (Setup.unlabeled)
    kwargs: dict = field(default_factory=dict)
    short: str = ""  # the plot's legend name (default: name)


def methods_for(recipe: recipes.Recipe) -> list[Method]:
    budget = recipe.calm
    calm = dict(updates=budget.updates, batches_per_task=budget.batches_per_task, batch_size=budget.batch_size)
    loop = (f"{budget.updates} updates x {budget.batches_per_task} batch(es) of {budget.batch_size}"
            if (budget.updates, budget.batches_per_task, budget.batch_size) != (100, 2, 128) else "")
    loop = f", {loop}" if loop else ""
    dfc = calm_fast.DataFreeConfig()
    return [
        Method("pretrained", "pretrained backbone + task heads", "pretrained", short="pretrained"),
        Method("average", "weight averaging", "average", dfc, short="average"),
        Method("task_arithmetic", f"task arithmetic (λ {dfc.scaling})", "task_arithmetic", dfc,
               short="task arithmetic"),
        Method("ties", f"TIES (λ {dfc.scaling}, top {dfc.density:.0%})", "ties", dfc, short="TIES"),
        Method("consensus", f"consensus / TALL (λ {dfc.scaling}, k {dfc.min_votes})", "consensus", dfc,
               short="TALL/consensus"),
        Method("calm", f"CALM, defaults, transductive{loop}", "calm", calm_fast.CALMConfig(**calm), short="CALM"),
        Method("calm_auto", f"CALM, order=auto, transductive{loop}", "calm",
               calm_fast.CALMConfig(order="auto", **calm), short="CALM auto"),
        Method("calm_honest", f"CALM, defaults, held-out unlabeled{loop}", "calm",
               calm_fast.CALMConfig(**calm), unlabeled="heldout", short="CALM held-out"),
        Method("calm_auto_honest", f"CALM, order=auto, held-out unlabeled{loop}", "calm",
               calm_fast.CALMConfig(order="auto", **calm), unlabeled="heldout", short="CALM auto held-out"),
        Method("calm_pooled_honest", f"CALM, defaults, held-out unlabeled + fine-tuning inputs{loop}", "calm",
               calm_fast.CALMConfig(**calm), unlabeled="heldout+train", short="CALM held-out + FT inputs"),
        Method("calm_honest_authors_scaling",
               f"CALM, the authors' initial λ {AUTHORS_SCALING}, held-out unlabeled{loop}", "calm",
               calm_fast.CALMConfig(init_scaling=AUTHORS_SCALING, **calm), unlabeled="heldout",
               short="CALM held-out, authors' λ"),
        Method("calm_honest_trial", f"CALM, initial λ from trial loops, held-out unlabeled{loop}", "calm",
               calm_fast.CALMConfig(init_scaling="trial", **calm), unlabeled="heldout", short="CALM held-out, trial λ"),
    ]


@dataclass
class Setup:
    """Everything a merge needs, built once per run."""

    recipe: recipes.Recipe
    device: torch.device
    tasks: list
    pretrained: dict
    finetuned: dict  # task -> backbone state dict
    heads: dict  # task -> frozen nn.Linear
    finetune_info: dict
    tests: dict  # task -> Split (evaluation)
    heldout: dict  # task -> Split (honest unlabeled data; labels never given to CALM)
    evaluator: torch.nn.Module

    def unlabeled(self, which: str) -> dict[str, torch.Tensor]:
        """uint8 NHWC inputs only, no labels: "test" (transductive), "heldout" (honest), or
        "heldout+train" (honest, plus the inputs each model was fine-tuned on: a larger pool)."""
        if which == "heldout+train":
            return {t.name: torch.cat([self.heldout[t.name].x, training_split(t, self.recipe.finetune, i).x])
                    for i, t in enumerate(self.tasks)}
        splits = self.tests if which == "test" else self.heldout
        return {t: s.x for t, s in splits.items()}

    def evaluate(self, state: dict) -> dict[str, float]:
        ev = self.recipe.evaluation
        return accuracy(self.evaluator, state, self.heads, self.tests, self.recipe.finetune.image_size,
                        ev.batch_size, self.device)


def prepare(recipe: recipes.Recipe, device, log=print, retrain: bool = False) -> Setup:
    device = torch.device(device)
    tasks = [load_task(name) for name in TASKS]
    ft = fine_tuned(tasks, recipe.finetune, device, retrain=retrain, log=log)
    size = recipe.finetune.image_size
    pretrained = {k: v.cpu() for k, v in load_backbone(size).state_dict().items()}
    ev, seed = recipe.evaluation, recipe.seed
    tests = {t.name: subsample(t.test, ev.test_examples, 100 + seed + i) for i, t in enumerate(tasks)}
    heldout = {t.name: subsample(t.unlabeled, ev.unlabeled_examples, 200 + seed + i) for i, t in enumerate(tasks)}
    return Setup(recipe, device, tasks, pretrained, {t: v[0] for t, v in ft.items()},
                 {t: v[1] for t, v in ft.items()}, {t: v[2] for t, v in ft.items()}, tests, heldout,
                 load_backbone(size).to(device))


def merge(setup: Setup, spec: Method, progress: bool = False):
    """(merged state dict, MergeResult or None, seconds)."""
    if spec.method == "pretrained":
        return setup.pretrained, None, 0.0
    kwargs = dict(method=spec.method, config=spec.config, device=setup.device, seed=setup.recipe.seed,
                  progress=progress)
    if spec.method == "calm":
        model = load_backbone(setup.recipe.finetune.image_size)
        kwargs.update(model=model, heads=setup.heads, data=setup.unlabeled(spec.unlabeled),
                      forward=make_forward(model, setup.recipe.finetune.image_size))
    kwargs.update(spec.kwargs)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = calm_fast.merge(setup.pretrained, setup.finetuned, **kwargs)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    return result.state_dict, result, time.perf_counter() - start


@torch.no_grad()
def pseudo_label_quality(setup: Setup, ratio: float = 0.9, pools=("test", "heldout")) -> dict:
    """How good CALM's pseudo-labels are (measured here with the true labels, which CALM never
    sees): accuracy of the fine-tuned model on each unlabeled pool, all and CB-EMS-kept. On the
    "test" pool, accuracy_all is the individual model's test accuracy."""
    size, bs = setup.recipe.finetune.image_size, setup.recipe.evaluation.batch_size
    model = setup.evaluator
    out = {}
    pools = ("test",) + tuple(p for p in pools if p != "test")
    for pool_name, splits in (("test", setup.tests), ("heldout", setup.heldout)):
        if pool_name not in pools:
            continue
        for task, split in splits.items():
            model.load_state_dict({k: v.to(setup.device) for k, v in setup.finetuned[task].items()})
            head = setup.heads[task].to(setup.device)
            logits = torch.cat([head(features(model, _prep(split.x[b: b + bs], size, setup.device))).float().cpu()
                                for b in range(0, len(split), bs)])
            entropy, pred = calm_fast.ops.entropy_argmax(logits.contiguous())
            keep = sampling.select_low_entropy(entropy, pred, ratio, balanced=True)
            out.setdefault(pool_name, {})[task] = {
                "pool": len(split), "kept": len(keep),
                "accuracy_all": float((pred == split.y).float().mean()),
                "accuracy_kept": float((pred[keep] == split.y[keep]).float().mean()),
                "classes_predicted": int(torch.unique(pred).numel()), "classes_true": int(torch.unique(split.y).numel()),
            }
    return out


def _prep(x, size, device):
    from .data import preprocess

    return preprocess(x.to(device), size)


def summarize(acc: dict, individual: dict) -> dict:
    norm = {t: acc[t] / individual[t] if individual[t] > 0 else float("nan") for t in acc}
    return {"accuracy": acc, "average": sum(acc.values()) / len(acc), "normalized": norm,
            "normalized_average": sum(norm.values()) / len(norm)}


def calm_summary(result) -> dict:
    rep = result.report
    return {"initial": rep.initial, "sequential": rep.sequential, "order_reason": rep.order_reason,
            "agreement": rep.agreement, "mask_density": rep.mask_density,
            "pseudo_label_counts": {t: sum(c.values()) for t, c in rep.pseudo_labels.items()},
            "pool_sizes": rep.pool_sizes, "losses_first_last": {t: [l[0], l[-1]] for t, l in rep.losses.items()},
            "step_sizes_first_last": {t: [s[0], s[-1]] for t, s in rep.step_sizes.items()},
            "init_scaling": rep.init_scaling, "scaling_agreement": rep.scaling_agreement,
            "trial_agreement": rep.trial_agreement,
            "checks": rep.checks, "best_update": rep.best_update, "seconds": rep.seconds}


def run(size: str = "ci", device: str = "cpu", only=None, log=print, retrain: bool = False,
        recipe: recipes.Recipe | None = None, pools=("test", "heldout")) -> dict:
    """Fine-tune (or load cached), merge with every method (or those named in `only`), evaluate.
    pools: the unlabeled pools whose pseudo-label quality is measured ("test" is always measured:
    it gives the individual models' accuracy)."""
    recipe = recipe or recipes.get(size)
    t0 = time.perf_counter()
    setup = prepare(recipe, device, log=log, retrain=retrain)
    t_ft = time.perf_counter() - t0
    log(f"setup + fine-tuning: {t_ft:.0f}s (checkpoints cached: "
        f"{all(i.get('cached') for i in setup.finetune_info.values())})")
    pseudo = pseudo_label_quality(setup, pools=pools)
    individual = {t: pseudo["test"][t]["accuracy_all"] for t in TASKS}  # own model on its own test split
    log("individual: " + ", ".join(f"{t} {a:.3f}" for t, a in individual.items()))
    rows = [{"name": "individual", "label": "individual fine-tuned models (each on its own task)",
             "short": "individual", **summarize(individual, individual), "merge_seconds": 0.0}]
    for spec in methods_for(recipe):
        if only and spec.name not in only:
            continue
        state, result, seconds = merge(setup, spec)
        row = {"name": spec.name, "label": spec.label, "short": spec.short or spec.name,
               **summarize(setup.evaluate(state), individual),
               "merge_seconds": seconds}
        if spec.method == "calm":
            row["calm"] = calm_summary(result)
            row["unlabeled"] = UNLABELED[spec.unlabeled]
        rows.append(row)
        extra = ""
        if "calm" in row:
            extra = (f" sequential={row['calm']['sequential']} density="
                     f"{ {t: round(d, 5) for t, d in row['calm']['mask_density'].items()} }")
        log(f"{spec.name:18s} avg {row['average']:.3f} norm {row['normalized_average']:.3f} "
            f"({seconds:.1f}s){extra}")
    out = {
        "benchmark": "quality", "size": recipe.name, "recipe": recipe.to_dict(), "tasks": list(TASKS),
        "device": str(setup.device), "environment": _environment(setup.device),
        "examples": {"test": {t: len(s) for t, s in setup.tests.items()},
                     "heldout_unlabeled": {t: len(s) for t, s in setup.heldout.items()},
                     "train": {t: i["examples"] for t, i in setup.finetune_info.items()}},
        "fine_tune": setup.finetune_info, "individual": individual, "rows": rows,
        "pseudo_labels": pseudo,
        "seconds": {"setup_and_fine_tune": t_ft, "total": time.perf_counter() - t0},
    }
    out["bar"] = check_bar(rows)
    return out


def _environment(device) -> dict:
    env = {"loadavg_1min_at_end": harness.loadavg() if hasattr(os, "getloadavg") else None,
           "torch": torch.__version__, "calm_fast": calm_fast.__version__, "native": calm_fast.NATIVE,
           "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "machine": platform.machine()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def check_bar(rows: list[dict]) -> dict:
    """Each CALM row against the bar: its keep, and its margin over TIES and task arithmetic."""
    by = {r["name"]: r for r in rows}
    out = {"keep": recipes.BAR_KEEP, "margin": recipes.BAR_MARGIN}
    for name in (r["name"] for r in rows if "calm" in r):
        n = by[name]["normalized_average"]
        entry = {"normalized_average": n, "keeps": n >= recipes.BAR_KEEP}
        for base in ("ties", "task_arithmetic"):
            if base in by:
                entry[f"minus_{base}"] = n - by[base]["normalized_average"]
                entry[f"beats_{base}_by_margin"] = n - by[base]["normalized_average"] >= recipes.BAR_MARGIN
        out[name] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(recipes.RECIPES), default="ci")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--fetch", action="store_true", help="run scripts/fetch_quality_data.py first")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even when cached")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only re-render the .md and .png of an existing results JSON")
    args = parser.parse_args(argv)
    if args.render:
        res = json.loads(args.render.read_text())
        for path in write(res, args.render.parent, stem=args.render.stem):
            print(path)
        return 0
    if args.fetch:
        import subprocess

        subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_quality_data.py")], check=True)
    try:
        res = run(args.size, args.device, only=args.only, retrain=args.retrain)
    except MissingSource as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in write(res, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
