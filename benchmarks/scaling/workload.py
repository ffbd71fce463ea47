"""The scaling sweep's workload: open_clip towers scaled down for a CPU, the sweeps over T, model
size and pool size, and the checkpoints every point merges from."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

MB = 2**20
METHODS = ("calm", "task_arithmetic", "ties", "consensus")
DATA_FREE = METHODS[1:]
LABELS = {"calm": "CALM", "task_arithmetic": "task arithmetic", "ties": "TIES", "consensus": "TALL"}
# open_clip towers, scaled down for a CPU: the model's own width and patch size, fewer layers, 32 px
TOWERS = {
    "XS": dict(model="ViT-S-16", vision_width=64, vision_layers=2),  # --quick only
    "S": dict(model="ViT-S-16", vision_width=None, vision_layers=4),
    "B": dict(model="ViT-B-16", vision_width=None, vision_layers=4),
    "L": dict(model="ViT-L-14", vision_width=None, vision_layers=6),
}
SWEEPS = {  # name -> (towers, task counts, pool sizes, methods)
    "tasks": (["B"], [2, 4, 8, 16], [64], METHODS),
    "size": (["S", "B", "L"], [4], [64], METHODS),
    "pool": (["S"], [4], [32, 64, 256, 1024], ("calm",)),
}
QUICK = {"tasks": (["XS"], [2], [16], METHODS), "size": (["XS"], [2], [16], METHODS),
         "pool": (["XS"], [2], [16], ("calm",))}
IMAGE_SIZE, CLASSES, BATCH, UPDATES, SEED = 32, 4, 8, 3, 0


def tower_args(tower: str) -> SimpleNamespace:
    """What benchmarks.e2e.problem.build_backbone reads."""
    return SimpleNamespace(**TOWERS[tower], patch_size=None, image_size=IMAGE_SIZE, seed=SEED,
                           grad_checkpointing=False)


def write_checkpoints(folder: Path, tower: str, tasks: int) -> dict:
    """pretrained.safetensors + task{i}.safetensors (i < tasks) of one tower; sizes of the model."""
    import torch
    from safetensors.torch import save_file

    from ..e2e import problem as e2e

    folder.mkdir(parents=True, exist_ok=True)
    theta0 = {k: v.detach().clone().contiguous() for k, v in e2e.build_backbone(tower_args(tower)).state_dict().items()}
    save_file(theta0, str(folder / "pretrained.safetensors"))
    for i in range(tasks):  # one at a time; task i's seed does not depend on how many are written
        tuned = e2e.synthetic_finetuned(theta0, [f"task{i}"], SEED + 1000 * i, noise=0.01, coord=0.1,
                                        coord_fraction=0.06, device=torch.device("cpu"))
        save_file({k: v.contiguous() for k, v in tuned[f"task{i}"].items()}, str(folder / f"task{i}.safetensors"))
        del tuned
    merged = {k: v for k, v in theta0.items() if v.is_floating_point()}
    return {"num_params": sum(v.numel() for v in merged.values()),
            "param_bytes": sum(v.numel() * v.element_size() for v in merged.values()),
            "largest_param_bytes": max(v.numel() * v.element_size() for v in merged.values()),
            "num_tensors": len(merged)}


def points(sweeps: dict) -> list[dict]:
    """The distinct (method, tower, T, pool) points, each with the sweeps it belongs to."""
    out = {}
    for name, (towers, task_counts, pools, methods) in sweeps.items():
        for tower in towers:
            for T in task_counts:
                for pool in pools:
                    for m in methods:
                        out.setdefault((m, tower, T, pool), []).append(name)
    return [{"method": m, "tower": tw, "T": T, "pool": p, "sweeps": s} for (m, tw, T, p), s in out.items()]
