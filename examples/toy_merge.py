"""Merge four fine-tuned copies of a small MLP with every method and compare accuracies.

Four synthetic tasks share one backbone and conflict with each other (each task's labels
come from a different random projection), so task arithmetic suffers from interference and a
merge has room to show. CALM sees the test inputs without labels (the paper's setting).
Run: python examples/toy_merge.py [--device cuda] [--updates 100]
"""
import argparse
import time

import torch
from torch import nn

import calm_fast

DIM, HIDDEN, CLASSES, TASKS = 16, 64, 4, ("north", "east", "south", "west")


def backbone():
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())


def make_task(g):
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


@torch.no_grad()
def accuracy(state_dict, heads, tests):
    model = backbone()
    model.load_state_dict(state_dict)
    return {t: float((heads[t](model(x)).argmax(1) == y).float().mean()) for t, (x, y) in tests.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    pretrained = backbone()
    finetuned, heads, tests = {}, {}, {}
    for task in TASKS:
        x, y, x_test, y_test = make_task(g)
        finetuned[task], heads[task] = fine_tune(pretrained, x, y)
        tests[task] = (x_test, y_test)
    unlabeled = {t: x for t, (x, _) in tests.items()}

    rows = [("pretrained", accuracy(pretrained.state_dict(), heads, tests), 0.0)]
    rows += [(f"individual ({t})", accuracy(m.state_dict(), heads, {t: tests[t]}), 0.0) for t, m in finetuned.items()]
    runs = [(m, dict(method=m)) for m in ("average", "task_arithmetic", "ties", "consensus")]
    runs += [("calm (normalized step)", dict(method="calm", config=calm_fast.CALMConfig(updates=args.updates))),
             ("calm (authors' lr 1e7)", dict(method="calm", config=calm_fast.CALMConfig(updates=args.updates,
                                                                                         step="authors"))),
             ("calm (order=auto)", dict(method="calm", config=calm_fast.CALMConfig(updates=args.updates,
                                                                                    order="auto")))]
    for name, kwargs in runs:
        start = time.perf_counter()
        result = calm_fast.merge(pretrained, finetuned, heads=heads, data=unlabeled, device=args.device,
                                 seed=args.seed, progress=False, **kwargs)
        rows.append((name, accuracy({k: v.cpu() for k, v in result.state_dict.items()}, heads, tests),
                     time.perf_counter() - start))
        if result.report is not None:
            print(f"{name}: sequential {result.report.sequential}, mask density "
                  f"{ {t: round(d, 4) for t, d in result.report.mask_density.items()} }")
    print(f"\n| method | mean acc | {' | '.join(TASKS)} | merge s |\n|---|---|{'---|' * len(TASKS)}---|")
    for name, acc, seconds in rows:
        cells = " | ".join(f"{acc[t]:.3f}" if t in acc else "" for t in TASKS)
        print(f"| {name} | {sum(acc.values()) / len(acc):.3f} | {cells} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
