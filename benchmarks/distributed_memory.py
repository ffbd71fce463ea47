"""Peak host memory and time per rank of a distributed data-free merge (calm_fast.distributed,
gloo on CPU) against one process (calm_fast.merge(...).save()), on the same checkpoints.

    python -m benchmarks.distributed_memory [--tasks 4] [--model-mb 64] [--world 2]
                                            [--methods task_arithmetic ties consensus] [--out DIR]

The claim under test (calm_fast/distributed/data_free.py): each rank reads only its keys and
holds one output shard of merged weights at a time (TIES: plus one task's vectors of its keys),
so a rank's peak is about 1/world of the single process's, and nothing is gathered on one rank.
Checkpoints: benchmarks/stream_memory.py's synthetic ViT-like fp32 model and T noisy copies,
one .safetensors file each. Each run is a fresh process per rank; the window (peak RSS reset via
/proc/self/clear_refs, a 1 ms RssAnon sampler) covers the merge and the write, after a tiny
warm-up merge. The distributed output is checked bit-identical to the single-process one.
Output: benchmarks/results/distributed_memory_cpu.{json,md} (or --out DIR).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import harness
from .harness import MemoryWindow
from .stream_memory import MB, RESULTS, make_checkpoints


def child(args) -> None:
    """One rank (or the single process): warm up, reset the peak, merge + write, report."""
    from datetime import timedelta

    import torch

    import calm_fast
    from calm_fast.distributed import merge_data_free, process_group

    spec = json.loads(Path(args.spec).read_text())
    tiny = {"w": torch.randn(64, 64)}
    tiny_tasks = {f"t{i}": {"w": tiny["w"] + 0.01 * i} for i in range(3)}
    rank = int(os.environ.get("RANK", 0))
    group = process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=args.world,
                          timeout=timedelta(seconds=120)) if args.world else contextlib.nullcontext()
    with group:
        if args.world:
            run = lambda pre, ft, out: merge_data_free(pre, ft, args.method, None, out)  # noqa: E731
        else:
            run = lambda pre, ft, out: calm_fast.merge(pre, ft, method=args.method, device="cpu",  # noqa: E731
                                                       progress=False).save(out)
        run(tiny, tiny_tasks, os.path.join(args.scratch, "warm"))
        with MemoryWindow("cpu", sample="always") as window:
            start = time.perf_counter()
            run(spec["pretrained"], spec["task_paths"], args.output)
            seconds = time.perf_counter() - start
        harness.emit({"rank": rank, "seconds": seconds,
                      "peak_above_baseline": window.end["VmHWM"] - window.baseline["VmRSS"],
                      "anon_above_baseline": window.peak_anon_above_baseline})


def run_case(spec_path: Path, scratch: Path, method: str, world: int) -> list[dict]:
    """The single process (world 0) or `world` ranks of one merge; their reports."""
    tag = f"{method}-{world or 'single'}"
    warm = scratch / f"{tag}-warm"  # the warm-up merge's output, one for all ranks
    warm.mkdir()
    procs = [harness.start_fresh(__spec__.name, ["--child", "--spec", str(spec_path), "--method", method,
                                                 "--world", str(world), "--store", str(scratch / f"{tag}.store"),
                                                 "--scratch", str(warm), "--output", str(scratch / tag)],
                                 env={"OMP_NUM_THREADS": "1", "RANK": str(rank)})
             for rank in range(max(world, 1))]
    return [harness.finish(proc, tag, timeout=1800) for proc in procs]


def identical(a: Path, b: Path) -> bool:
    import torch

    from calm_fast.checkpoint import read_checkpoint

    x, y = read_checkpoint(str(a)), read_checkpoint(str(b))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def markdown(payload: dict) -> str:
    w = payload["workload"]
    lines = ["# Peak host memory per rank of a distributed data-free merge", "",
             f"- {payload['machine']}; date {payload['date']}; command: `{payload['command']}`",
             f"- workload: T = {w['tasks']} fine-tuned + 1 pretrained safetensors checkpoint, ViT-like fp32, "
             f"model {w['model_bytes'] / MB:.1f} MB, largest parameter {w['largest_param_bytes'] / MB:.1f} MB; "
             f"gloo, {payload['world']} ranks on one host, OMP_NUM_THREADS=1 per process",
             "- peak RSS = VmHWM above the RSS after a warm-up merge (file-backed pages included); anon = sampled "
             "RssAnon peak above its baseline; × model = over the model's bytes", "",
             "| method | run | peak RSS MB | × model | anon MB | × model | seconds | bit-identical |",
             "|---|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        lines.append(f"| {row['method']} | {row['run']} | {row['peak_above_baseline'] / MB:.0f} | "
                     f"{row['peak_above_baseline'] / w['model_bytes']:.2f} | {row['anon_above_baseline'] / MB:.0f} | "
                     f"{row['anon_above_baseline'] / w['model_bytes']:.2f} | {row['seconds']:.2f} | "
                     f"{row['identical']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = harness.ranks_parser(__doc__, RESULTS, ("--spec", "--method", "--store", "--scratch", "--output"))
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--model-mb", type=float, default=64)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "consensus"])
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="distributed_memory_") as tmp:
        scratch = Path(tmp)
        info = make_checkpoints(scratch / "checkpoints", args.tasks, args.model_mb)
        spec_path = scratch / "spec.json"
        spec_path.write_text(json.dumps(info))
        rows = []
        for method in args.methods:
            single = run_case(spec_path, scratch, method, 0)[0]
            ranks = run_case(spec_path, scratch, method, args.world)
            same = identical(scratch / f"{method}-single", scratch / f"{method}-{args.world}")
            rows.append({"method": method, "run": "one process", **single, "identical": "-"})
            rows += [{"method": method, "run": f"rank {r['rank']} of {args.world}", **r, "identical": same}
                     for r in ranks]
            print(f"{method}: single {single['peak_above_baseline'] / MB:.0f} MB, ranks "
                  f"{[round(r['peak_above_baseline'] / MB) for r in ranks]} MB, identical {same}", flush=True)
    payload = {"workload": {"tasks": args.tasks, **{k: info[k] for k in ("model_bytes", "largest_param_bytes")}},
               "world": args.world, "rows": rows, "machine": f"{harness.cpu_model()} ({os.cpu_count()} CPUs)",
               "date": harness.utc_now(), "command": harness.command_line(__spec__.name, argv or sys.argv[1:])}
    harness.write_results(args.out, "distributed_memory_cpu", payload, markdown(payload))
    return 0 if all(row["identical"] in (True, "-") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
