"""Merge four fine-tuned copies of a small MLP with every method and compare accuracies.

The four synthetic tasks of toy_tasks.py conflict with each other, so task arithmetic suffers
from interference and a merge has room to show. CALM sees the test inputs without labels (the
paper's setting).
Run: python examples/toy_merge.py [--device cuda] [--updates 100]
"""
import argparse
import time

import calm_fast
from toy_tasks import TASKS, accuracy, build


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrained, finetuned, heads, tests = build(args.seed)
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
