"""Fine-tune the backbone once per task (recipe fixed, see recipes.FineTune) and cache the result.

Checkpoints: CACHE/checkpoints/<recipe key>/<task>.safetensors (the backbone's state dict, the
thing that gets merged) and <task>.head.safetensors (its frozen linear head), plus <task>.json
(recipe, timings, training loss). A later run with the same recipe loads them instead of
training; any change of the recipe, of the splits or of the weights changes the key.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import Split, Task, cache_dir, preprocess, subsample
from .model import features, load_backbone, make_head
from .recipes import FineTune


def checkpoint_dir(recipe: FineTune) -> Path:
    return cache_dir() / "checkpoints" / recipe.key()


def _paths(recipe: FineTune, task: str):
    folder = checkpoint_dir(recipe)
    return folder / f"{task}.safetensors", folder / f"{task}.head.safetensors", folder / f"{task}.json"


def _save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def training_split(task: Task, recipe: FineTune, task_index: int) -> Split:
    """The examples task `task_index` is fine-tuned on (all of the train split, or the recipe's subset)."""
    return subsample(task.train, recipe.train_examples, recipe.seed * 1000 + task_index)


def train_task(task: Task, recipe: FineTune, task_index: int, device, log=print):
    """(backbone state dict, head state dict, info) of one task's fine-tuned model."""
    seed = recipe.seed * 1000 + task_index
    torch.manual_seed(seed)
    model = load_backbone(recipe.image_size).to(device)
    head = make_head(task.num_classes, seed).to(device)
    if recipe.batchnorm != "eval" or recipe.augment != "none":
        raise ValueError("only batchnorm='eval' and augment='none' are implemented")
    model.eval()  # frozen BatchNorm statistics, no dropout / drop-connect
    train = training_split(task, recipe, task_index)
    x_all, y_all = train.x.to(device), train.y.to(device)
    optimizer = torch.optim.Adam([
        {"params": list(model.parameters()), "lr": recipe.backbone_lr},
        {"params": list(head.parameters()), "lr": recipe.head_lr},
    ], weight_decay=recipe.weight_decay)
    order = torch.Generator().manual_seed(seed)
    losses, correct, start = [], 0, time.perf_counter()
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(train), generator=order).to(device)
        total, correct, seen = 0.0, 0, 0
        for begin in range(0, len(train), recipe.batch_size):
            idx = perm[begin: begin + recipe.batch_size]
            x, y = preprocess(x_all[idx], recipe.image_size), y_all[idx]
            logits = head(features(model, x))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        losses.append(total / seen)
        log(f"  fine-tune {task.name}: epoch {epoch + 1}/{recipe.epochs} loss {losses[-1]:.3f} "
            f"train acc {correct / seen:.3f} ({time.perf_counter() - start:.0f}s)")
    info = {"task": task.name, "examples": len(train), "epoch_losses": losses,
            "final_epoch_train_accuracy": correct / max(seen, 1),
            "seconds": time.perf_counter() - start, "device": str(device)}
    return model.state_dict(), head.state_dict(), info


def fine_tuned(tasks: list[Task], recipe: FineTune, device, retrain: bool = False, log=print):
    """task -> (backbone state dict, head nn.Linear, info), from the cache or trained now."""
    out = {}
    folder = checkpoint_dir(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    for index, task in enumerate(tasks):
        weights, head_path, meta = _paths(recipe, task.name)
        if retrain or not (weights.exists() and head_path.exists() and meta.exists()):
            log(f"fine-tuning {task.name} ({task.num_classes} classes) -> {folder}")
            state, head_state, info = train_task(task, recipe, index, device, log)
            info["recipe"] = recipe.__dict__
            _save(state, weights)
            _save(head_state, head_path)
            meta.write_text(json.dumps(info, indent=2))
            info["cached"] = False
        else:
            info = json.loads(meta.read_text())
            info["cached"] = True
        head = make_head(task.num_classes, 0)
        head.load_state_dict(load_file(str(head_path)))
        out[task.name] = (load_file(str(weights)), head.requires_grad_(False).eval(), info)
    return out
