"""`calm-fast`: merge from a config file or a task-vectors checkpoint folder, evaluate, replay masks,
inspect masks, show the build, run the op benchmarks."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from .methods import METHODS

log = logging.getLogger("calm_fast")


_TASK_VECTORS_FLAGS = {"tasks": "tasks", "data": "data", "model": "model", "zeroshot": "zeroshot",
                       "text_tower": "text_tower", "heads_cache": "heads_cache", "workers": "workers",
                       "pretrained": "pretrained"}


def _job(args, *, merging: bool):
    """The job of a config file, or of --task-vectors ROOT and its flags (paths relative to the cwd)."""
    from . import config as config_file

    given = [f"--{k.replace('_', '-')}" for k in _TASK_VECTORS_FLAGS if getattr(args, k, None) is not None]
    if args.config and args.task_vectors:
        raise ValueError("give a config file or --task-vectors ROOT, not both")
    if args.config:
        extra = given + (["--method", "--option"] if merging and (args.method or args.option) else [])
        if extra:
            raise ValueError(f"{', '.join(extra)} go with --task-vectors; a config file sets them itself")
        return config_file.load(args.config)
    if not args.task_vectors:
        raise ValueError("give a config file, or --task-vectors ROOT --tasks A,B,... [--data DIR]")
    block = {"root": args.task_vectors, **{field: getattr(args, flag) for flag, field in _TASK_VECTORS_FLAGS.items()
                                           if getattr(args, flag, None) is not None}}
    if getattr(args, "batch_size", None) is not None:
        block["batch_size"] = args.batch_size
    method = (args.method or "calm") if merging else "task_arithmetic"
    raw = {"method": method, "task_vectors": block, "seed": getattr(args, "seed", 0) or 0,
           "output": (args.output or f"merged-{method}") if merging else "unused",
           "options": _options(args.option or []) if merging else {}}
    try:
        return config_file.parse(raw, os.getcwd())
    except config_file.ConfigError as exc:  # name the flag, not the config field
        raise config_file.ConfigError(str(exc).replace("field 'task_vectors.", "--").replace("field 'task_vectors'",
                                                                                             "--task-vectors")) from None


def _options(pairs: list[str]) -> dict:
    """--option key=value (value read as YAML: 50, 0.3, true, [MNIST, DTD])."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes key=value, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _merge(args) -> int:
    import calm_fast

    from .merge import REPORT_FILE, progress_bar

    job = _job(args, merging=True)
    if args.device:
        job.device = args.device
    overwrite = job.overwrite or args.overwrite
    if os.path.exists(job.output) and not overwrite and not args.check:  # fail before the work
        raise FileExistsError(f"calm_fast: {job.output} exists; set overwrite: true or pass --overwrite")
    if _launched_by_torchrun() and not args.check:
        return _merge_distributed(job, args, overwrite)
    pretrained, finetuned = job.weights(progress_bar(not args.quiet))
    made = job.build(progress_bar(not args.quiet))
    if args.check:
        summary = calm_fast.check(pretrained, finetuned, method=job.method, config=job.options,
                                  progress=not args.quiet, **{k: v for k, v in made.items() if k != "forward"})
        print(json.dumps({**summary, "output": job.output}, indent=2))
        return 0
    log.info("merging %d task(s) with %s into %s", len(finetuned), job.method, job.output)
    result = calm_fast.merge(pretrained, finetuned, method=job.method, config=job.options, device=job.device,
                             seed=job.seed, progress=not args.quiet, progress_file=job.progress_file, **made)
    result.save(job.output, max_shard_bytes=job.shard_size, overwrite=overwrite, progress=not args.quiet)
    _finish(job)
    log.info("wrote %s (report: %s)", job.output, os.path.join(job.output, REPORT_FILE))
    if result.report is not None:
        log.info("order: initial %s (λ %s), sequential %s; mask density %s", result.report.initial,
                 result.report.init_scaling, result.report.sequential,
                 {t: round(d, 5) for t, d in result.report.mask_density.items()})
    return 0


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _merge_distributed(job, args, overwrite) -> int:
    """Under `torchrun --nproc-per-node N`: every rank runs the same job (calm_fast.distributed):
    CALM on the model sharded by FSDP2, a data-free merge split by keys; each rank writes its part
    of the output. Collectives time out after $CALM_FAST_DIST_TIMEOUT seconds (default 300), so
    a lost rank is an error, not a hang."""
    import datetime

    import torch
    import torch.distributed as dist

    import calm_fast

    from .distributed.process_group import process_group
    from .merge import progress_bar

    device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # one GPU per rank unless the config names one
        device = device if device.index is not None else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    job.device = str(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("CALM_FAST_DIST_TIMEOUT", "300")))
    with process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout):
        bar = progress_bar(not args.quiet and dist.get_rank() == 0)
        pretrained, finetuned = job.weights(bar)
        calm_fast.merge(pretrained, finetuned, method=job.method, config=job.options, device=device, seed=job.seed,
                        progress=bar is not None, progress_file=job.progress_file, output=job.output,
                        overwrite=overwrite, max_shard_bytes=job.shard_size, **job.build(bar))
        dist.barrier()
        if dist.get_rank() == 0:
            _finish(job)
        log.info("rank %d of %d: wrote its part of %s", dist.get_rank(), dist.get_world_size(), job.output)
    return 0


def _finish(job) -> None:
    """What follows a written merge: the model's own files beside the weights, no progress file."""
    if job.clip is not None:  # e.g. config.json beside Hugging Face CLIP weights
        job.clip.layout.write_model_files(job.output)
    if job.progress_file and os.path.exists(job.progress_file):
        os.remove(job.progress_file)


def _evaluate(args) -> int:
    """Per-task accuracy of each --weights with the layout's heads, as a table or JSON."""
    job = _job(args, merging=False)
    if job.clip is None:
        raise ValueError("evaluate needs a task_vectors job (a config with a task_vectors block, or --task-vectors)")
    if args.batch_size is not None:
        job.clip.batch_size = args.batch_size
    weights = args.weights or ([job.output] if args.config else None)
    if not weights:
        raise ValueError("give --weights: zeroshot, finetuned, or a merged folder / checkpoint")
    results = {}
    for w in weights:
        log.info("evaluating %s", w)
        results[w] = job.clip.evaluate(w, device=args.device or job.device, progress=not args.quiet)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        columns = [*job.clip.tasks, "mean"]
        width = max(len(w) for w in weights)
        print(f"{'weights':{width}s}  " + "  ".join(f"{c:>9s}" for c in columns))
        for w, row in results.items():
            print(f"{w:{width}s}  " + "  ".join(f"{100 * row[c]:9.2f}" for c in columns))
    return 0


def _replay(args) -> int:
    import calm_fast

    from . import config as config_file
    from .checkpoint import save_checkpoint
    from .merge import MASKS_FILE, progress_bar

    job = config_file.load(args.config)
    masks = args.masks or os.path.join(job.output, MASKS_FILE)
    pretrained, finetuned = job.weights()
    merged = calm_fast.replay(pretrained, finetuned, masks, device=args.device or job.device,
                              progress=not args.quiet)
    save_checkpoint(merged, args.output, max_shard_bytes=job.shard_size, overwrite=args.overwrite,
                    progress=progress_bar(not args.quiet))
    log.info("replayed %s into %s", masks, args.output)
    return 0


def _inspect(args) -> int:
    from . import mask_report

    path = args.masks
    if os.path.isdir(path):
        from .merge import MASKS_FILE

        path = os.path.join(path, MASKS_FILE)
    table = mask_report.densities(path)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(mask_report.format_table(table))
    if args.png:
        mask_report.plot(table, args.png)
        log.info("wrote %s", args.png)
    return 0


def build_info() -> dict:
    """What this installation runs on: for bug reports and for checking a build."""
    import importlib.util

    import torch

    import calm_fast
    from . import _extension, ops

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "calm_fast": calm_fast.__version__, "torch": torch.__version__,
        "triton": importlib.util.find_spec("triton") is not None,
        "native": _extension.NATIVE, "native_load_error": _extension.LOAD_ERROR,
        "cpu_isa": _extension.CPU_ISA, "cpu_isa_best": _extension.best_cpu_isa(),
        "cpu_threads": _extension.cpu_kernels.num_threads() if _extension.NATIVE else torch.get_num_threads(),
        "native_cuda": _extension.NATIVE_CUDA,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "backend": {d: ops.resolve_backend(torch.device(d)) for d in devices},
    }


def _info(args) -> int:
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(f"{k:18s} {v}" for k, v in info.items()))
    return 0


def _bench(args) -> int:
    from ._source_tree import import_subpackage

    ops_bench = importlib.import_module(f"{import_subpackage('benchmarks').__name__}.ops.run")

    argv = list(args.bench_args)
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", "calm-fast-bench"]
    sys.argv[0] = "calm-fast bench"  # the benchmark's own parser names itself after argv[0]
    return ops_bench.main(argv)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p = argparse.ArgumentParser(prog="calm-fast", description=__doc__,
                                epilog="The config file format is documented in calm_fast/config.py and the README.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tv = _task_vectors_flags()
    _add_merge(sub, [common, tv])
    _add_evaluate(sub, [common, tv])
    _add_tools(sub, [common])
    return p


def _task_vectors_flags() -> argparse.ArgumentParser:
    """The flags that name a task-vectors (or FusionBench) layout, shared by merge and evaluate."""
    tv = argparse.ArgumentParser(add_help=False)
    g = tv.add_argument_group("task-vectors checkpoints (instead of a config file)")
    g.add_argument("--task-vectors", metavar="ROOT",
                   help="checkpoints/<model> folder: zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt; or a "
                        "FusionBench root: _pretrained_/ (Hugging Face CLIPModel folder), <task>/ (CLIPVisionModel "
                        "folders; needs the hf extra)")
    g.add_argument("--tasks", help="comma-separated task names, e.g. MNIST,EuroSAT,DTD")
    g.add_argument("--data", metavar="DIR", help="image folders, one per task: DIR/<Task>/[<class>/]*.jpg")
    g.add_argument("--model", help="open_clip model name (default: ROOT's folder name, e.g. ViT-B-32)")
    g.add_argument("--zeroshot", metavar="FILE",
                   help="YAML/JSON: task -> {classes: [...], templates: ['a photo of a {}.']}, for tasks "
                        "without head_<Task>.pt")
    g.add_argument("--text-tower", metavar="PATH", help="open_clip checkpoint holding the text tower (zero-shot heads); "
                                                         "Hugging Face form: a CLIPModel folder")
    g.add_argument("--pretrained", metavar="DIR",
                   help="Hugging Face form: the pretrained CLIP folder (default ROOT/_pretrained_); ROOT then holds "
                        "only the <task>/ folders")
    g.add_argument("--heads-cache", metavar="DIR", help="where zero-shot heads are cached (safetensors)")
    g.add_argument("--workers", type=int, help="image decoding threads")
    return tv


def _add_merge(sub, parents) -> None:
    m = sub.add_parser("merge", parents=parents,
                       help="merge the checkpoints a YAML config (or --task-vectors ROOT) names; write weights, "
                            "masks, report",
                       description="Merge with CALM or a data-free method as CONFIG says, or straight from a "
                                   "task-vectors checkpoint folder (--task-vectors ROOT --tasks ... --data DIR). "
                                   "Writes OUTPUT/ "
                                   "(sharded safetensors, masks.safetensors for CALM, report.json) atomically; "
                                   "a CALM run saves each finished step to OUTPUT.progress.safetensors and "
                                   "continues from it when restarted with the same config.")
    m.add_argument("config", nargs="?", help="YAML config file (format: calm_fast/config.py, README)")
    m.add_argument("--method", help=f"with --task-vectors: one of {', '.join(METHODS)} (default calm)")
    m.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="with --task-vectors: a CALMConfig / DataFreeConfig field, e.g. updates=50, "
                        "sequential=[MNIST,DTD] (repeatable)")
    m.add_argument("--output", help="with --task-vectors: output folder (default merged-<method>)")
    m.add_argument("--seed", type=int, help="with --task-vectors: random seed (default 0)")
    m.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--check", action="store_true",
                   help="validate the config, checkpoints (every tensor read once: keys, shapes, dtypes, "
                        "NaN/Inf) and CALM's heads/data/model, print a summary; merge and write nothing")
    m.set_defaults(run=_merge)


def _add_evaluate(sub, parents) -> None:
    e = sub.add_parser("evaluate", parents=parents,
                       help="per-task accuracy of checkpoints with the task-vectors heads on labeled image folders",
                       description="Top-1 accuracy per task (and the mean) of each --weights, with the layout's "
                                   "heads (head_<Task>.pt or zero-shot), on DIR/<Task>/<class>/ image folders. "
                                   "Class folders map to labels by the zero-shot class names when given, else "
                                   "by their integer names (0/, 1/, ...), else in sorted order.")
    e.add_argument("config", nargs="?", help="a merge config with a task_vectors block (default --weights: its output)")
    e.add_argument("--weights", nargs="+", metavar="W",
                   help="zeroshot, finetuned (each task's own model), or merged folders / checkpoints to compare")
    e.add_argument("--batch-size", type=int, help="images per batch (default 128)")
    e.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(run=_evaluate)


def _add_tools(sub, parents) -> None:
    """replay, inspect, info, bench."""
    r = sub.add_parser("replay", parents=parents,
                       help="rebuild CALM's merged weights from a mask file, without data",
                       description="Rebuild the merged weights from the config's pretrained and fine-tuned "
                                   "checkpoints and a mask file; no heads, data or factory are needed.")
    r.add_argument("config", help="the YAML config of the merge (its checkpoints are read)")
    r.add_argument("--masks", help="mask file (default: OUTPUT/masks.safetensors of the config)")
    r.add_argument("--output", required=True, help="where to write: a folder, or a .safetensors file")
    r.add_argument("--device", help="override the config's device")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output")
    r.set_defaults(run=_replay)

    i = sub.add_parser("inspect", parents=parents,
                       help="mask density per parameter and step, as a table and a PNG",
                       description="Print the density (kept fraction) of each step's mask per parameter.")
    i.add_argument("masks", help="a mask file, or a merge output folder holding masks.safetensors")
    i.add_argument("--png", help="also write a heat map of the densities to this PNG (needs matplotlib)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(run=_inspect)

    n = sub.add_parser("info", parents=parents, help="versions, native builds (CPU ISA, CUDA) and backends here",
                       description="Print what this installation runs on: calm_fast and torch versions, whether the "
                                   "native kernels loaded and which CPU ISA build, CUDA kernels, GPUs, and the "
                                   "backend each device's ops run on.")
    n.add_argument("--json", action="store_true", help="print JSON")
    n.set_defaults(run=_info)

    b = sub.add_parser("bench", add_help=False,
                       help="run the op microbenchmarks (eager vs compile vs native vs Triton)",
                       description="Every argument after 'bench' goes to the op benchmark; "
                                   "'calm-fast bench --help' lists them. Results go to ./calm-fast-bench "
                                   "unless --out is given.")
    b.set_defaults(run=_bench, quiet=False)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        args = p.parse_args(argv[:1])
        args.bench_args = argv[1:]
    else:
        args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="calm-fast: %(message)s")
    try:
        return args.run(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"calm-fast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
