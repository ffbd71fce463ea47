"""The op benchmark's options and main: cases in turn, results rewritten after each one."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from calm_fast import _extension

from .. import harness
from . import __doc__ as DOC
from .cases import OPS, build_cases
from .measure import bench_case
from .report import evaluate_targets, fmt_row, markdown, metadata, slow_native, slug
from .sizes import VIT_L14_VISUAL, parse_count, parse_shape

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
VARIANTS = ("eager", "compile", "native", "triton")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--sizes", nargs="+", type=parse_count,
                   help="elements of the element-wise ops (default CPU 16M, GPU 256M; K/M/G binary)")
    p.add_argument("--consensus-sizes", nargs="+", type=parse_count,
                   help="elements per task vector (default: --sizes / 4 on CPU, / 8 on GPU)")
    p.add_argument("--threshold-sizes", nargs="+", type=parse_count,
                   help="total elements of the tensor list (default CPU 16M, GPU 303966208; "
                        "with --sizes: those)")
    p.add_argument("--entropy-shapes", nargs="+", type=parse_shape,
                   help="BxC logits (default CPU 16384x1000, GPU 65536x1000; with --sizes: size/1000 x 1000)")
    p.add_argument("--tasks", type=int, default=8, help="task vectors of consensus_merge")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="default: all (--quick: all but compile, whose first call costs ~20 s here)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, short timing, 1 CPU thread unless --threads: runs in seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads, which the native CPU kernels follow too)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking each variant's output against eager")
    p.add_argument("--strict", action="store_true", help="exit 1 if a check fails or a variant errors")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results, "
                                               "benchmarks/results/quick with --quick)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    explicit_sizes = args.sizes is not None
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (args.quick and v == "compile")]
    if args.quick:
        args.sizes = args.sizes or [256 << 10]
        args.consensus_sizes = args.consensus_sizes or [64 << 10]
        args.threshold_sizes = args.threshold_sizes or [256 << 10]
        args.entropy_shapes = args.entropy_shapes or [(256, 1000)]
        explicit_sizes = True
    if not args.sizes:
        args.sizes = [(256 if gpu else 16) << 20]
    if not args.consensus_sizes:
        args.consensus_sizes = [max(1, s // (8 if gpu else 4)) for s in args.sizes]
    if not args.threshold_sizes:
        args.threshold_sizes = list(args.sizes) if explicit_sizes else [VIT_L14_VISUAL if gpu else 16 << 20]
    if not args.entropy_shapes:
        args.entropy_shapes = ([(max(1, s // 1000), 1000) for s in args.sizes] if explicit_sizes
                               else [((65536 if gpu else 16384), 1000)])
    if args.threads is None and args.quick and not gpu:
        args.threads = 1  # a smoke test: a single thread shrugs off other processes' load
    if args.out is None:
        args.out = str(HERE / "results" / "quick") if args.quick else str(HERE / "results")
    return args, device





class Results:
    """The rows so far, rewritten as JSON + markdown after every case: a run cut short (a lent
    GPU's time limit) still leaves what it measured, marked partial."""

    def __init__(self, args, argv, device, out: Path, copy_gbps: list[float], loadavg: list[float], t_start: float):
        self.args, self.argv, self.device, self.out = args, argv, device, out
        self.copy_gbps, self.loadavg, self.t_start = copy_gbps, loadavg, t_start
        self.stem = f"ops_{slug(device)}"
        self.seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run

    def save(self, rows: list[dict], partial: bool):
        ceiling = max(self.copy_gbps)
        for r in rows:  # fractions against the best copy measurement so far
            if r.get("gbps") is not None:
                r["frac_copy"] = round(r["gbps"] / ceiling, 3)
        targets, notes = evaluate_targets(rows, self.device), slow_native(rows)
        meta = metadata(self.args, self.argv, self.device, self.copy_gbps, self.loadavg)
        meta.update(wall_s=round(time.perf_counter() - self.t_start, 1), seed=self.seed, partial=partial)
        payload = dict(metadata=meta, rows=rows, targets=targets, slower_than_baseline=notes)
        harness.write_results(self.out, self.stem, payload, markdown(meta, rows, targets, notes), indent=1)
        return meta, targets, notes


def start(args, device) -> tuple[harness.Timer, list[float], list[float]]:
    """Threads, dynamo limits, the timer; the load average and copy bandwidth at the start."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    timer = harness.Timer(device, args.quick)
    print(f"calm_fast op benchmarks on {harness.device_name(device)} ({device}); torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, native={_extension.NATIVE} "
          f"native_cuda={_extension.NATIVE_CUDA}", flush=True)
    loadavg = [harness.loadavg()]
    if device.type == "cpu" and loadavg[0] > 0.5 * harness.cores():
        print(f"WARNING: load average {loadavg[0]:.2f} on {harness.cores()} cores: other "
              "processes compete for the CPU and the timings will be noisy", flush=True)
    copy_gbps = [harness.copy_bandwidth(device, timer)]
    print(f"copy bandwidth (read+write): {copy_gbps[0]:.1f} GB/s", flush=True)
    return timer, copy_gbps, loadavg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, device = parse_args(argv)
    t_start = time.perf_counter()
    timer, copy_gbps, loadavg = start(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and out == HERE / "results" / "quick":
        (out / ".gitignore").write_text("*\n")
    results = Results(args, argv, device, out, copy_gbps, loadavg, t_start)
    gen = torch.Generator(device=device).manual_seed(results.seed)
    cache = harness.last_level_cache_bytes(device)
    rows = []
    for case in build_cases(args, device):
        rows += bench_case(case, args.variants, device, timer, cache, gen, args.check, max(copy_gbps),
                           lambda r: print(fmt_row(r), flush=True))
        results.save(rows, partial=True)
    copy_gbps.append(harness.copy_bandwidth(device, timer))
    loadavg.append(harness.loadavg())
    print(f"copy bandwidth at the end: {copy_gbps[1]:.1f} GB/s (fractions use {max(copy_gbps):.1f})")
    meta, targets, notes = results.save(rows, partial=False)
    print()
    print(f"targets ({sum(t['met'] for t in targets)}/{len(targets)} met):")
    for t in targets:
        print(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['goal']} (got {t['got']})")
    for n in notes:
        print(f"  slower: {n}")
    print(f"wrote {out / (results.stem + '.json')} and {out / (results.stem + '.md')} in {meta['wall_s']} s")
    failed = [r for r in rows if r.get("error") or (r.get("check") or "").startswith("FAIL")]
    if failed:
        print(f"{len(failed)} row(s) errored or failed their check")
    return 1 if (args.strict and failed) else 0
