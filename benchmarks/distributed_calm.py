"""Distributed CALM (calm_fast.merge inside a gloo process group: FSDP2 shards, every rank writes
its part) against one process: per-rank peak host memory and seconds, whether both merge alike,
and CALM's memory per rank on paper (benchmarks/memory_model.py) beside the measured peaks.

    python -m benchmarks.distributed_calm [--quick] [--world 2] [--out DIR]

Workload: open_clip's ViT-B-32 image tower with random weights (--quick: 64 wide, 2 blocks,
32 px), T = 2 fine-tuned copies (seeded noise, benchmarks.e2e.problem.synthetic_finetuned) as
safetensors files; per task a seeded random image pool and a seeded random linear head
(512 -> 10) centred on the pretrained tower's features of that pool.
Each run is a fresh process per rank (OMP_NUM_THREADS=1, gloo file store, as
tests/distributed_calm_worker.py starts them), once under glibc's default allocator and once with
its mmap threshold fixed at 1 MiB (the default keeps freed parameter-sized blocks in its heap).
After a tiny warm-up merge, the window covers building the architecture (whole on every rank:
merge_calm shards a whole module), the merge and the write.
Output: benchmarks/results/distributed_calm_cpu.{json,md} (--quick: distributed_calm_cpu_quick).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from . import harness
from .harness import MemoryWindow, MiB, table_header
from .memory_model import NOTES, gpu_rows, gpu_table, per_rank_bytes, saved_activation_bytes

RESULTS = harness.ROOT / "benchmarks" / "results"
TASKS, CLASSES, EMBED, SEED, LOGIT_SCALE = ("task0", "task1"), 10, 512, 0, 5.0
CONFIG = {"updates": 2, "batch_size": 8, "score_batch_size": 16, "num_sequential": 1, "sparsity": 1e-3}
WORKLOADS = {
    "full": {"tower": {"vision_width": None, "vision_layers": 12, "patch_size": None, "image_size": 224},
             "images": 32, "config": CONFIG},
    "quick": {"tower": {"vision_width": 64, "vision_layers": 2, "patch_size": 8, "image_size": 32},
              "images": 16, "config": CONFIG},
}
# glibc's default grows its mmap threshold up to 32 MiB as large blocks are freed, and then keeps
# freed parameter-sized blocks in its heap; a fixed 1 MiB threshold gives them back to the OS
ALLOCATORS = {"glibc default": 0, "mmap threshold 1 MiB": 1 << 20}
SAMPLE_SECONDS = 0.01  # RssAnon sampling: 1 ms costs a 2-core host with 2 ranks a third of its time
WARM_UP = {**WORKLOADS["quick"], "images": 8, "config": {**CONFIG, "updates": 1, "batch_size": 4}}


def build_tower(tower: dict):
    """The ViT-B-32 image tower (or a narrower one), random weights from SEED, fp32."""
    from .e2e.problem import build_backbone

    return build_backbone(SimpleNamespace(model="ViT-B-32", seed=SEED, grad_checkpointing=False, **tower))


def image_pools(workload: dict) -> dict:
    """Per task a pool of seeded random images: every rank draws the same ones, none read from disk."""
    import torch

    size = workload["tower"]["image_size"]
    return {task: torch.randn(workload["images"], 3, size, size, generator=torch.Generator().manual_seed(SEED + i))
            for i, task in enumerate(TASKS)}


def centred_heads(tower, pools: dict) -> dict:
    """Per task a linear head 512 -> CLASSES: seeded random directions over the features minus
    their mean on the task's pool (a random tower's features share one large direction, and
    uncentred heads give every image the same pseudo-label, which CALM refuses)."""
    import torch

    heads = {}
    with torch.no_grad():
        for i, (task, images) in enumerate(pools.items()):
            features = tower(images)
            mean, spread = features.mean(0), (features - features.mean(0)).norm(dim=1).mean()
            head = torch.nn.Linear(EMBED, CLASSES)
            head.weight.copy_(torch.randn(CLASSES, EMBED, generator=torch.Generator().manual_seed(SEED + 100 + i)))
            head.weight.mul_(LOGIT_SCALE / (head.weight.norm(dim=1, keepdim=True) * spread))
            head.bias.copy_(-head.weight @ mean)
            heads[task] = head.requires_grad_(False)
    return heads


def merge(pretrained, finetuned, heads: dict, workload: dict, output: str):
    """calm_fast.merge(method="calm", output=...), as the single process and every rank call it."""
    import calm_fast
    from calm_fast.calm.config import AUTHORS_SCALING

    model = build_tower(workload["tower"])
    config = calm_fast.CALMConfig(init_scaling=AUTHORS_SCALING, **workload["config"])  # a fixed λ: this times the loop
    start = time.perf_counter()
    result = calm_fast.merge(pretrained, finetuned, method="calm", model=model, heads=heads,
                             data=image_pools(workload), config=config,
                             device="cpu", output=output, overwrite=True, progress=False)
    return result, time.perf_counter() - start


def warm_up(folder: str) -> None:
    """A tiny merge from in-memory weights: torch, open_clip, FSDP and gloo are loaded before the window."""
    import torch

    tower = build_tower(WARM_UP["tower"])
    theta0 = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    tuned = {t: {k: v + 0.01 * torch.randn_like(v) for k, v in theta0.items()} for t in TASKS}
    merge(theta0, tuned, centred_heads(tower, image_pools(WARM_UP)), WARM_UP, folder)


def child(args) -> None:
    """One rank (or the single process): warm up, then the measured merge; its report on stdout."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from calm_fast.distributed import process_group

    if int(args.mmap_threshold):
        harness.fix_malloc_mmap_threshold(int(args.mmap_threshold))
    spec = json.loads(Path(args.spec).read_text())
    rank = int(os.environ.get("RANK", "0"))
    group = process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=args.world,
                          timeout=timedelta(seconds=900)) if args.world else contextlib.nullcontext()
    with group:
        warm_up(os.path.join(args.scratch, "warm"))
        heads = {t: torch.nn.Linear(EMBED, CLASSES).requires_grad_(False) for t in TASKS}
        for task, state in torch.load(spec["heads"], weights_only=True).items():
            heads[task].load_state_dict(state)
        with MemoryWindow("cpu", sample="always", interval=SAMPLE_SECONDS) as window:
            result, seconds = merge(spec["pretrained"], spec["tasks"], heads, WORKLOADS[spec["workload"]], args.output)
        report = result.report
        harness.emit({"rank": rank, "seconds": seconds, "phases": report.seconds,
                      "peak_above_baseline": window.end["VmHWM"] - window.baseline["VmRSS"],
                      "anon_above_baseline": window.peak_anon_above_baseline,
                      "pseudo_labels": report.pseudo_labels, "sequential": report.sequential})
        if args.world:
            dist.barrier()  # no rank tears the group down while another still uses it


def write_checkpoints(folder: Path, workload: dict, world: int) -> dict:
    """pretrained + one file per task, the heads, and the tower's sizes the memory model needs:
    parameters, largest block, the rest (FSDP's root unit), saved activations of a rank's batch rows."""
    import torch
    from safetensors.torch import save_file

    from .e2e.problem import synthetic_finetuned

    folder.mkdir(parents=True)
    tower = build_tower(workload["tower"])
    theta0 = {k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}
    save_file(theta0, str(folder / "pretrained.safetensors"))
    for i, task in enumerate(TASKS):
        tuned = synthetic_finetuned(theta0, [task], SEED + 1000 * i, noise=0.01, coord=0.1, coord_fraction=0.06,
                                    device=torch.device("cpu"))[task]
        save_file({k: v.contiguous() for k, v in tuned.items()}, str(folder / f"{task}.safetensors"))
    heads = centred_heads(tower, image_pools(workload))
    torch.save({t: head.state_dict() for t, head in heads.items()}, folder / "heads.pt")
    params = sum(v.numel() for v in theta0.values() if v.is_floating_point())
    blocks = [sum(p.numel() for p in block.parameters()) for block in tower.transformer.resblocks]
    size = workload["tower"]["image_size"]
    rows = {n: -(-workload["config"]["batch_size"] // n) for n in (1, world)}  # a rank's rows of a batch
    return {"pretrained": str(folder / "pretrained.safetensors"),
            "tasks": {t: str(folder / f"{t}.safetensors") for t in TASKS}, "heads": str(folder / "heads.pt"),
            "params": params, "block": max(blocks), "root": params - sum(blocks),
            "activations": {n: saved_activation_bytes(tower, torch.randn(r, 3, size, size)) for n, r in rows.items()}}


def run_case(spec_path: Path, scratch: Path, world: int, mmap_threshold: int) -> tuple[Path, list[dict]]:
    """The single process (world 0) or `world` ranks, each a fresh process: output folder, reports."""
    tag = f"{f'world{world}' if world else 'single'}-mmap{mmap_threshold}"
    (scratch / f"{tag}-warm").mkdir()
    flags = {"--spec": spec_path, "--world": world, "--mmap-threshold": mmap_threshold,
             "--store": scratch / f"{tag}.store", "--scratch": scratch / f"{tag}-warm", "--output": scratch / tag}
    argv = ["--child", *(str(part) for pair in flags.items() for part in pair)]
    procs = [harness.start_fresh(__spec__.name, argv, env={"OMP_NUM_THREADS": "1", "RANK": str(rank)})
             for rank in range(max(world, 1))]
    return scratch / tag, [harness.finish(proc, tag, timeout=1800) for proc in procs]


def agreement(single_dir: Path, ranks_dir: Path, single: dict, ranks: list[dict]) -> dict:
    """Whether the ranks' merge is the single process's: report choices, mask bits, weights."""
    from calm_fast import maskfile, ops
    from calm_fast.checkpoint import read_checkpoint

    a, b = (maskfile.read(str(d / "masks.safetensors"))[0] for d in (single_dir, ranks_dir))
    differing = total = 0
    for task in a.sequential:
        for key, packed in a.bits[task].items():
            numel = math.prod(a.parameters[key])
            differing += int((ops.unpack_mask(packed, numel) != ops.unpack_mask(b.bits[task][key], numel)).sum())
            total += numel
    x, y = read_checkpoint(str(single_dir)), read_checkpoint(str(ranks_dir))
    gaps = [(x[k].float() - y[k].float()).abs() for k in x]
    return {"pseudo_labels_equal": all(r["pseudo_labels"] == single["pseudo_labels"] for r in ranks),
            "sequential_equal": all(r["sequential"] == single["sequential"] == b.sequential for r in ranks),
            "mask_bits": total, "mask_bits_differing": differing, "mask_bits_differing_fraction": differing / total,
            "weights_differing": sum(int((gap > 0).sum()) for gap in gaps),
            "max_abs_weight_diff": max(float(gap.max()) for gap in gaps)}


def predicted(sizes: dict, ranks: int) -> dict:
    """The memory model for the measured workload: fp32 parameters, gradients and δ."""
    return per_rank_bytes(sizes["params"], sizes["block"], sizes["root"], ranks, 4, 4, 4, sizes["activations"][ranks])


def measure(spec_path: Path, scratch: Path, sizes: dict, world: int) -> tuple[list[dict], dict]:
    """One process and `world` ranks under each allocator setting: rows per process, agreement."""
    rows, agreements = [], {}
    for allocator, threshold in ALLOCATORS.items():
        single_dir, (single,) = run_case(spec_path, scratch, 0, threshold)
        ranks_dir, ranks = run_case(spec_path, scratch, world, threshold)
        agreements[allocator] = agreement(single_dir, ranks_dir, single, ranks)
        rows.append({"allocator": allocator, "run": "one process", **single, "predicted": predicted(sizes, 1)})
        rows += [{"allocator": allocator, "run": f"rank {r['rank']} of {world}", **r,
                  "predicted": predicted(sizes, world)} for r in ranks]
        print(f"{allocator}: one process {single['peak_above_baseline'] / MiB:.0f} MB, {single['seconds']:.1f} s; "
              f"ranks {[round(r['peak_above_baseline'] / MiB) for r in ranks]} MB, "
              f"{[round(r['seconds'], 1) for r in ranks]} s; {agreements[allocator]}", flush=True)
    return rows, agreements


def run_table(rows: list[dict]) -> list[str]:
    """Per allocator, run and rank: seconds, phases, measured peaks and the model's prediction."""
    phases = list(dict.fromkeys(k for row in rows for k in row["phases"]))
    columns = ["allocator", "run", "seconds", *phases, "peak RSS MB", "anon MB", "predicted MB", "anon / predicted"]
    lines = table_header(columns, "ll" + "r" * (len(columns) - 2))
    for row in rows:
        anon, model = row["anon_above_baseline"], row["predicted"]["total"]
        lines.append(f"| {row['allocator']} | {row['run']} | {row['seconds']:.1f} | "
                     + " | ".join(f"{row['phases'].get(p, 0):.1f}" for p in phases)
                     + f" | {row['peak_above_baseline'] / MiB:.0f} | {anon / MiB:.0f} | {model / MiB:.0f} | "
                     f"{anon / model:.2f} |")
    return lines


def markdown(payload: dict) -> str:
    w, s, load = payload["workload"], payload["sizes"], payload["loadavg"]
    lines = ["# Distributed CALM (FSDP2, gloo) against one process: memory per rank, time, agreement", "",
             (f"- {payload['machine']}; date {payload['date']}; command: `{payload['command']}`; 1-minute load "
              f"average at start and end {load[0]:.1f}, {load[1]:.1f} (timings are noisy on a shared host)"),
             (f"- workload ({payload['mode']}): open_clip ViT-B-32 image tower, random weights, tower "
              f"{w['tower']}, P = {s['params'] / 1e6:.1f}M fp32 ({s['params'] * 4 / MiB:.0f} MB), largest block "
              f"{s['block'] / 1e6:.2f}M, rest (root unit) {s['root'] / 1e6:.2f}M; T = {len(TASKS)} noisy copies as "
              f"safetensors; per task a random linear head 512 -> {CLASSES} centred on the tower's features and "
              f"{w['images']} random images; CALMConfig {w['config']}"),
             (f"- each run a fresh process per rank, OMP_NUM_THREADS=1, gloo file store, {payload['world']} ranks "
              "on one host; a tiny warm-up merge (64-wide tower) first, then the window: building the architecture "
              "(whole on every rank), calm_fast.merge and the write; under glibc's default allocator and with "
              "its mmap threshold fixed at 1 MiB (mallopt, harness.fix_malloc_mmap_threshold)"),
             ("- peak RSS = VmHWM above the RSS after the warm-up (file-backed checkpoint pages included); anon = "
              f"RssAnon peak above its baseline, sampled every {SAMPLE_SECONDS * 1000:.0f} ms; seconds = "
              "calm_fast.merge incl. writing, then its report's phases; predicted = the memory model below"), "",
             *run_table(payload["rows"]), "",
             "Predicted, by part (MB; activations: autograd's saved tensors of a rank's rows of one batch, "
             "measured): " + "; ".join(
                 f"N = {n}: sharded {p['sharded'] / MiB:.0f} + whole units {p['whole_units'] / MiB:.0f} + "
                 f"activations {p['activations'] / MiB:.0f} = {p['total'] / MiB:.0f}"
                 for n, p in payload["predicted"].items()), "",
             "## Agreement of one process and the ranks", ""]
    for allocator, agree in payload["agreement"].items():
        lines.append(f"- {allocator}: pseudo-labels equal {agree['pseudo_labels_equal']}, sequential order equal "
                     f"{agree['sequential_equal']}, mask bits differing {agree['mask_bits_differing']} of "
                     f"{agree['mask_bits']} ({agree['mask_bits_differing_fraction']:.2e}), weights differing "
                     f"{agree['weights_differing']}, max |weight difference| {agree['max_abs_weight_diff']:.3g}")
    lines += ["", "## Memory model (benchmarks/memory_model.py)", "", NOTES, "",
              ("On GPUs: bf16 parameters, gradients and δ, activations not included; left = 90% of the GPU's "
               "memory minus the state (negative: does not fit); host memory at load = the architecture each rank "
               "builds before fully_shard moves it to its GPU unit by unit:"), "", *gpu_table(payload["gpu_rows"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = harness.ranks_parser(__doc__, RESULTS, ("--spec", "--store", "--scratch", "--output", "--mmap-threshold"))
    parser.add_argument("--quick", action="store_true", help="a 64-wide, 2-block tower (seconds, for tests)")
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    mode, load_start = "quick" if args.quick else "full", harness.loadavg()
    with tempfile.TemporaryDirectory(prefix="distributed_calm_") as tmp:
        scratch = Path(tmp)
        sizes = write_checkpoints(scratch / "checkpoints", WORKLOADS[mode], args.world)
        spec_path = scratch / "spec.json"
        spec_path.write_text(json.dumps({**sizes, "workload": mode}))
        rows, agreements = measure(spec_path, scratch, sizes, args.world)
    payload = {"mode": mode, "workload": WORKLOADS[mode], "world": args.world,
               "sizes": {k: sizes[k] for k in ("params", "block", "root", "activations")}, "rows": rows,
               "agreement": agreements, "predicted": {n: predicted(sizes, n) for n in (1, args.world)},
               "gpu_rows": gpu_rows(), "machine": f"{harness.cpu_model()} ({os.cpu_count()} CPUs)",
               "date": harness.utc_now(), "loadavg": [load_start, harness.loadavg()],
               "command": harness.command_line(__spec__.name, sys.argv[1:] if argv is None else argv)}
    harness.write_results(args.out, "distributed_calm_cpu" + ("_quick" if args.quick else ""), payload,
                          markdown(payload))
    same = all(a["pseudo_labels_equal"] and a["sequential_equal"] for a in agreements.values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
