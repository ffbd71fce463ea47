"""What a mask file holds: the kept fraction of each step's mask per parameter (`calm-fast inspect`)."""
from __future__ import annotations

import math

from . import maskfile, ops


def densities(path: str) -> dict:
    """{"steps", "initial", "overall": {step: density}, "parameters": {key: {"numel", "density":
    {step: density, or None where the step left the parameter unmasked}}}}."""
    masks, _, _ = maskfile.read(path)
    parameters, kept, total = {}, dict.fromkeys(masks.sequential, 0), dict.fromkeys(masks.sequential, 0)
    for key, shape in masks.parameters.items():
        numel = math.prod(shape)
        row = {}
        for task in masks.sequential:
            if key in masks.no_grad_keys[task]:
                row[task] = None
                continue
            on = int(ops.unpack_mask(masks.bits[task][key], numel).sum())
            row[task] = on / numel if numel else 0.0
            kept[task] += on
            total[task] += numel
        parameters[key] = {"numel": numel, "density": row}
    return {"initial": masks.initial, "steps": masks.sequential, "calm_fast_version": masks.version,
            "overall": {t: kept[t] / total[t] if total[t] else 0.0 for t in masks.sequential},
            "parameters": parameters}


def format_table(table: dict) -> str:
    steps = table["steps"]
    width = max([len("all masked parameters")] + [len(k) for k in table["parameters"]])
    head = f"{'parameter':<{width}}  {'numel':>11}  " + "  ".join(f"{t:>12}" for t in steps)
    lines = [f"initial (task arithmetic): {', '.join(table['initial']) or '-'}", head, "-" * len(head)]
    for key, row in table["parameters"].items():
        cells = ["unmasked" if row["density"][t] is None else f"{row['density'][t]:.6f}" for t in steps]
        lines.append(f"{key:<{width}}  {row['numel']:>11}  " + "  ".join(f"{c:>12}" for c in cells))
    lines.append("-" * len(head))
    lines.append(f"{'all masked parameters':<{width}}  {'':>11}  "
                 + "  ".join(f"{table['overall'][t]:>12.6f}" for t in steps))
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    """A heat map: parameters (rows) x steps (columns), colour = density; grey where unmasked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as exc:
        raise ImportError("calm_fast: inspect --png needs matplotlib (pip install matplotlib)") from exc
    keys, steps = list(table["parameters"]), table["steps"]
    values = np.array([[np.nan if table["parameters"][k]["density"][t] is None else table["parameters"][k]["density"][t]
                        for t in steps] for k in keys], dtype=float).reshape(len(keys), len(steps))
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(steps), 1.5 + 0.22 * len(keys)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(steps)), steps)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xlabel("sequential step (task)")
    ax.set_title("CALM mask density per parameter (grey: unmasked)")
    fig.colorbar(image, ax=ax, label="kept fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
