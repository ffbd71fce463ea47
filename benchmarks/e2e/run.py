"""The end-to-end benchmark's options and main: setup, problem, variants, probes, checks, report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import harness
from ..harness import fix_malloc_mmap_threshold
from . import __doc__ as DOC
from .checks import checks_for, ratios_for, targets_for
from .measure import memory_probe, probe_internals
from .problem import DTYPES, Problem, build_problem, pseudo_label
from .report import markdown, metadata
from .variants import FULL_UPDATES, VARIANTS, run_variants

RESULTS = Path(__file__).resolve().parents[1] / "results"
PRESETS = {
    "cpu-small": dict(device="cpu", model="ViT-B-32", image_size=64, batch_size=8, updates=3,
                      pool_size=24, classes=4, score_batch_size=64, variants="a,b,c",
                      delta_dtype="fp32", autocast=False),
    "vit-l": dict(device="cuda", model="ViT-L-14", image_size=224, batch_size=128, updates=100,
                  pool_size=320, classes=10, score_batch_size=256, variants="a,b,c",
                  delta_dtype="fp32", autocast=False),
    "vit-h": dict(device="cuda", model="ViT-H-14", image_size=224, batch_size=128, updates=100,
                  pool_size=320, classes=10, score_batch_size=256, variants="c",
                  delta_dtype="bf16", autocast=True),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=DOC.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--device", help="cpu or cuda (default: the configuration's)")
    ap.add_argument("--model", help="open_clip model name (visual tower only is used)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--vision-width", type=int, help="override the tower's width (a smaller open_clip config)")
    ap.add_argument("--vision-layers", type=int, help="override the tower's depth")
    ap.add_argument("--patch-size", type=int, help="override the patch size")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--initial", type=int, default=6, help="tasks merged by task arithmetic; the rest are sequential")
    ap.add_argument("--updates", type=int, help="mask updates per sequential step (authors: 100)")
    ap.add_argument("--batches-per-task", type=int, default=2)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--pool-size", type=int, help="unlabeled images per task")
    ap.add_argument("--classes", type=int, help="classes per task head")
    ap.add_argument("--score-batch-size", type=int)
    ap.add_argument("--sparsity", type=float, default=1e-5, help="initial mask: top-k fraction of |τ|")
    ap.add_argument("--noise", type=float, default=0.01, help="dense noise of τ, x RMS of each tensor")
    ap.add_argument("--coord", type=float, default=0.1, help="coordinated rank-4 changes of τ, x RMS")
    ap.add_argument("--coord-fraction", type=float, default=0.06, help="fraction of matrices changed that way")
    ap.add_argument("--logit-scale", type=float, default=100.0, help="heads' logit scale (CLIP: 100)")
    ap.add_argument("--variants", help="comma-separated subset of a,b,c (default: the configuration's)")
    ap.add_argument("--delta-dtype", choices=sorted(DTYPES), help="δ storage of (b) and (c)")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast forward/backward in (b) and (c); (a) stays fp32 as the scripts")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="open_clip activation checkpointing in every variant (ViT-bigG-14 at batch 128 "
                         "needs it on an 80 GB GPU: its activations alone are ~100 GB in bf16)")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 matmuls (all variants); default: torch's defaults, as in the scripts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="glibc M_MMAP_THRESHOLD for the whole run (default: 1 MiB on CPU, untouched on "
                         "CUDA; 0 leaves glibc's dynamic threshold), see the module docstring")
    ap.add_argument("--no-internals", action="store_true", help="skip the calm_fast internals probe")
    ap.add_argument("--no-sync-count", action="store_true", help="CUDA: do not count synchronizations in (c)")
    ap.add_argument("--out", default=str(RESULTS), help="output folder")
    ap.add_argument("--name", help="output file stem (default e2e_<device>[_<config>])")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.config].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from a, b, c")
    if not 0 <= args.initial < args.tasks:
        ap.error("--initial must be in [0, --tasks)")
    return args




def setup_device(args) -> torch.device:
    """The device, TF32, threads and glibc's mmap threshold as args ask."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"e2e: --config {args.config} needs a CUDA device (none visible); "
                         f"use --config cpu-small or --device cpu")
    if args.tf32:  # otherwise torch's defaults, as in the scripts (TF32 off for matmuls, on for cuDNN)
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_mmap_threshold is None:
        args.malloc_mmap_threshold = (1 << 20) if device.type == "cpu" else 0
    if args.malloc_mmap_threshold:
        fix_malloc_mmap_threshold(args.malloc_mmap_threshold)
    return device


def workload_of(args, problem: Problem) -> dict:
    return {"config": args.config, "model": args.model, "image_size": args.image_size,
            "vision_overrides": {k: getattr(args, k) for k in ("vision_width", "vision_layers", "patch_size")
                                 if getattr(args, k)},
            "num_params": problem.num_params, "num_tensors": len(problem.keys), "param_bytes": problem.num_params * 4,
            "tasks": list(problem.finetuned), "initial": problem.initial, "sequential": problem.sequential,
            "updates": args.updates, "full_updates": FULL_UPDATES, "batches_per_task": args.batches_per_task,
            "batch_size": args.batch_size, "pool_size": args.pool_size, "classes": args.classes,
            "sparsity": args.sparsity, "noise": args.noise, "coord": args.coord,
            "coord_fraction": args.coord_fraction, "delta_dtype": args.delta_dtype, "autocast": args.autocast,
            "tf32": args.tf32, "grad_checkpointing": args.grad_checkpointing, "lr": problem.config.step_size,
            "seed": args.seed, "kept_per_task": {t: len(k) for t, (k, _) in problem.selected.items()}}


def variant_rows(variants: dict) -> dict:
    """The variants as saved: each row without its raw result, with the result's fields beside."""
    drop = ("masks", "recorded_batches", "phases", "updates")
    return {name: {**{k: v for k, v in row.items() if k != "result"},
                   "phases": row["result"]["phases"], "updates_detail": row["result"]["updates"],
                   **{k: v for k, v in row["result"].items() if k not in drop}}
            for name, row in variants.items()}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    device = setup_device(args)
    loadavg = [harness.loadavg()]
    torch.backends.cudnn.allow_tf32 = args.tf32
    problem = build_problem(args, device, log)
    pseudo_label_s = pseudo_label(problem, log)
    probe = memory_probe(problem, log)
    variants = run_variants(args, problem, probe, pseudo_label_s, log)
    internals = None
    if not args.no_internals:
        internals = probe_internals(problem, reps=20 if device.type == "cuda" else 3, log=log)
    loadavg.append(harness.loadavg())
    ratios = ratios_for(variants)
    payload = {
        "metadata": metadata(args, argv, device, loadavg), "workload": workload_of(args, problem),
        "pseudo_label_s": pseudo_label_s, "probe": probe, "variants": variant_rows(variants), "ratios": ratios,
        "checks": checks_for(variants, problem, args.seed), "targets": targets_for(args, device, variants, ratios),
        "internals": internals,
    }
    default_config = "cpu-small" if device.type == "cpu" else "vit-l"
    stem = args.name or (f"e2e_{harness.device_slug(device)}" + ("" if args.config == default_config else f"_{args.config}"))
    md = markdown(payload)
    paths = harness.write_results(args.out, stem, payload, md)
    log("")
    log(md)
    log(f"wrote {Path(args.out) / stem}.json and .md")
    payload["_masks"] = {name: row["result"]["masks"] for name, row in variants.items()}
    payload["_paths"] = [str(p) for p in paths]
    return payload
