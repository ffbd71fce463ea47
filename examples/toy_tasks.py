"""The toy problem of the examples: four conflicting tasks on one small MLP backbone.

Each task's labels come from a different random projection of the inputs, so the fine-tuned
copies interfere and a merge has room to show. Also the factory of the CLI examples:

    python examples/toy_tasks.py examples/toy      # fine-tune and write the checkpoints
    calm-fast merge examples/calm.yaml             # factory: toy_tasks.py:factory
"""
import argparse
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

DIM, HIDDEN, CLASSES, TASKS = 16, 64, 4, ("north", "east", "south", "west")


def backbone():
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())


def make_task(g):
    """(train inputs, train labels, test inputs, test labels) of one task."""
    projection = torch.randn(DIM, CLASSES, generator=g)
    x = torch.randn(1536, DIM, generator=g)
    return x[:1024], (x[:1024] @ projection).argmax(1), x[1024:], (x[1024:] @ projection).argmax(1)


def fine_tune(pretrained, x, y):
    model, head = backbone(), nn.Linear(HIDDEN, CLASSES)
    model.load_state_dict(pretrained.state_dict())
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(head(model(x)), y).backward()
        opt.step()
    return model, head.requires_grad_(False)


def build(seed: int = 0):
    """pretrained backbone, task -> fine-tuned backbone, task -> head, task -> (test x, test y)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pretrained = backbone()
    finetuned, heads, tests = {}, {}, {}
    for task in TASKS:
        x, y, x_test, y_test = make_task(g)
        finetuned[task], heads[task] = fine_tune(pretrained, x, y)
        tests[task] = (x_test, y_test)
    return pretrained, finetuned, heads, tests


@torch.no_grad()
def accuracy(state_dict, heads, tests):
    model = backbone()
    model.load_state_dict(state_dict)
    return {t: float((heads[t](model(x)).argmax(1) == y).float().mean()) for t, (x, y) in tests.items()}


def write_checkpoints(folder: str, seed: int = 0) -> None:
    """pretrained.safetensors, <task>.safetensors, heads.safetensors, tests.safetensors."""
    pretrained, finetuned, heads, tests = build(seed)
    os.makedirs(folder, exist_ok=True)
    save_file(pretrained.state_dict(), os.path.join(folder, "pretrained.safetensors"))
    for task, model in finetuned.items():
        save_file(model.state_dict(), os.path.join(folder, f"{task}.safetensors"))
    save_file({f"{t}.{k}": v for t, h in heads.items() for k, v in h.state_dict().items()},
              os.path.join(folder, "heads.safetensors"))
    save_file({f"{t}.{part}": v.contiguous() for t, (x, y) in tests.items() for part, v in (("x", x), ("y", y))},
              os.path.join(folder, "tests.safetensors"))


def load_heads_and_tests(folder: str):
    saved_heads, saved_tests = (load_file(os.path.join(folder, f)) for f in ("heads.safetensors", "tests.safetensors"))
    heads = {}
    for task in TASKS:
        heads[task] = nn.Linear(HIDDEN, CLASSES).requires_grad_(False)
        heads[task].load_state_dict({k: saved_heads[f"{task}.{k}"] for k in ("weight", "bias")})
    return heads, {t: (saved_tests[f"{t}.x"], saved_tests[f"{t}.y"]) for t in TASKS}


def factory(folder: str = "toy"):
    """The CLI's CALM factory: the architecture, the frozen heads, and each task's test inputs
    without labels (the paper's transductive setting). `folder` is relative to this file."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)
    heads, tests = load_heads_and_tests(folder)
    return {"model": backbone(), "heads": heads, "data": {t: x for t, (x, _) in tests.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fine-tune the toy tasks and write their checkpoints")
    parser.add_argument("folder", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_checkpoints(args.folder, args.seed)
    print(f"wrote the toy checkpoints into {args.folder}")
