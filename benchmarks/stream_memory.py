"""Peak host memory of a data-free merge of T models read lazily from safetensors checkpoints.

    python -m benchmarks.stream_memory [--tasks 8] [--model-mb 256]
                                       [--methods task_arithmetic ties consensus]
                                       [--loaders lazy load_file copy] [--workdir DIR] [--out DIR] [--quick]

The claim under test (calm_fast/merge.py, calm_fast/baselines.py): merging checkpoint *paths*
reads one parameter per task at a time, so peak host memory is about one model (the merged
weights) plus one parameter x T, not T models; TIES additionally holds one model's task vectors
(fp32) while it measures each task's threshold.

Workload: in a temporary folder (or --workdir), a synthetic ViT-like pretrained checkpoint (fp32:
patch embedding, position embedding, `blocks` x {qkv, attention out, mlp fc1/fc2 weights and
biases, two layer norms}, final norm, an int64 buffer that is carried, not merged) and T
fine-tuned copies (pretrained + small noise), each one single .safetensors file written with
safetensors.torch.save_file. The width is chosen so that the largest parameter (mlp fc1/fc2) is
a small fraction of the model (1/64 at the default 256 MB).

Each (method, loader) runs in a fresh subprocess (`--child`), so peaks do not mix:
  1. import torch + calm_fast, run a tiny warm-up merge + save of the same method (loads the
     extension and the OpenMP pool), gc + malloc_trim, then read the baseline from
     /proc/self/status (VmRSS, RssAnon, RssFile);
  2. reset the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and
     start a sampler thread reading /proc/self/status every ~1 ms;
  3. loader "lazy": calm_fast.merge(pretrained_path, {task: path}, method=m, device="cpu",
     progress=False); loader "load_file": the same merge given the T+1 state dicts from
     safetensors.torch.load_file (what a non-lazy loader does); loader "copy": load_file + clone
     of every tensor, i.e. the weights in anonymous memory (what torch.load of a .pt file
     without mmap, or safetensors.torch.load(bytes), gives);
  4. result.save(out_dir) (safetensors), then read VmHWM (peak RSS since the reset) and the
     sampled peaks.

Why two peaks: with safetensors >= 0.3 (0.8 here) and framework="pt", safe_open maps the whole
file and get_tensor / load_file return views into that mapping. The pages read stay in the
process's RSS as file-backed pages (RssFile) while the mapping lives: clean page cache the kernel
can drop under memory pressure without swapping, but VmHWM, `ps`, `top` and /usr/bin/time count
them. calm_fast's LazyStateDict therefore opens the file per access (only tensors still
referenced stay mapped); the load_file rows show what holding the mappings costs. The table gives
  - peak VmHWM - baseline VmRSS       (everything resident, file-backed pages included), and
  - peak RssAnon - baseline RssAnon   (anonymous memory: what the merge itself allocates and
                                       cannot be reclaimed without swap; sampled, so a transient
                                       shorter than the sampling interval can be missed),
each in MB and as a multiple of the model's bytes, beside the reference
"1 model + T x largest parameter".

Output: benchmarks/results/stream_memory_cpu.json and .md (or --out DIR), written atomically,
with the CPU model, torch / safetensors / calm_fast versions, the command line and the date.
--quick (T=6, 64 MB models) is the smoke test tests/test_stream_memory.py runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import harness
from .harness import MemoryWindow

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20
LOADERS = ("lazy", "load_file", "copy")
DEFAULT_METHODS = ("task_arithmetic", "ties", "consensus")


# ---- the synthetic checkpoints --------------------------------------------------------------------
def vit_shapes(model_mb: float) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """name -> shape of a ViT-like fp32 model of about model_mb MiB; (shapes, width, blocks)."""
    target = model_mb * MB / 4  # fp32 scalars
    width = 512 if model_mb >= 48 else 256 if model_mb >= 6 else 128
    tokens, patch = 197, 3 * 16 * 16
    per_block = 12 * width * width + 13 * width
    outside = width * patch + width + tokens * width + width + 2 * width
    blocks = max(1, round((target - outside) / per_block))
    shapes = {"patch_embed.proj.weight": (width, patch), "patch_embed.proj.bias": (width,),
              "pos_embed": (1, tokens, width), "cls_token": (1, 1, width)}
    for b in range(blocks):
        p = f"blocks.{b}."
        shapes.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,),
                       p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
                       p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
                       p + "norm2.weight": (width,), p + "norm2.bias": (width,),
                       p + "mlp.fc1.weight": (4 * width, width), p + "mlp.fc1.bias": (4 * width,),
                       p + "mlp.fc2.weight": (width, 4 * width), p + "mlp.fc2.bias": (width,)})
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    return shapes, width, blocks


def make_checkpoints(workdir: Path, tasks: int, model_mb: float, seed: int = 0) -> dict:
    """pretrained.safetensors + task{i}.safetensors in workdir; what was written."""
    import torch
    from safetensors.torch import save_file

    shapes, width, blocks = vit_shapes(model_mb)
    gen = torch.Generator().manual_seed(seed)
    pre = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
    pre["position_ids"] = torch.arange(197, dtype=torch.int64)  # a buffer: carried, not merged
    workdir.mkdir(parents=True, exist_ok=True)
    save_file(pre, str(workdir / "pretrained.safetensors"))
    paths = {}
    for t in range(tasks):
        tuned = {k: (v + torch.randn(v.shape, generator=gen) * 1e-3) if v.is_floating_point() else v
                 for k, v in pre.items()}
        paths[f"task{t}"] = str(workdir / f"task{t}.safetensors")
        save_file(tuned, paths[f"task{t}"])
        del tuned
    merged_bytes = sum(v.numel() * v.element_size() for v in pre.values() if v.is_floating_point())
    return {"pretrained": str(workdir / "pretrained.safetensors"), "task_paths": paths,
            "model_bytes": sum(v.numel() * v.element_size() for v in pre.values()),
            "merged_bytes": merged_bytes,
            "largest_param_bytes": max(v.numel() * v.element_size() for v in pre.values()),
            "num_tensors": len(pre), "width": width, "blocks": blocks,
            "file_bytes": (workdir / "pretrained.safetensors").stat().st_size}


# ---- one measurement, in a fresh process --------------------------------------------------------
def load(spec: dict, loader: str):
    """The pretrained and fine-tuned weights as the loader gives them to calm_fast.merge."""
    from safetensors.torch import load_file

    if loader == "lazy":
        return spec["pretrained"], dict(spec["task_paths"])
    if loader == "load_file":
        return load_file(spec["pretrained"]), {t: load_file(p) for t, p in spec["task_paths"].items()}
    if loader == "copy":
        return ({k: v.clone() for k, v in load_file(spec["pretrained"]).items()},
                {t: {k: v.clone() for k, v in load_file(p).items()} for t, p in spec["task_paths"].items()})
    raise ValueError(loader)


def child(args) -> dict:
    """One (method, loader): warm up, then load + merge + save inside a memory window."""
    import torch

    import calm_fast

    spec = json.loads(Path(args.spec).read_text())
    method, loader = args.method, args.loader
    scratch = Path(tempfile.mkdtemp(prefix="stream_memory_child_", dir=args.scratch))
    try:
        # warm-up on a tiny in-memory model: extension, OpenMP pool, safetensors writer
        tiny = {"w": torch.randn(64, 64), "b": torch.randn(64)}
        tiny_tasks = {f"t{i}": {k: v + 0.01 * torch.randn_like(v) for k, v in tiny.items()} for i in range(3)}
        calm_fast.merge(tiny, tiny_tasks, method=method, device="cpu", progress=False).save(scratch / "warm")
        del tiny, tiny_tasks
        with MemoryWindow("cpu", sample="always", interval=args.interval) as window:
            t0 = time.perf_counter()
            pretrained, finetuned = load(spec, loader)
            t_load = time.perf_counter() - t0
            result = calm_fast.merge(pretrained, finetuned, method=method, device="cpu", progress=False)
            t_merge = time.perf_counter() - t0 - t_load
            result.save(scratch / "merged")
            t_total = time.perf_counter() - t0
        saved = sum(f.stat().st_size for f in (scratch / "merged").glob("*.safetensors"))
        del pretrained, finetuned
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sampler, end = window.sampler, window.end
    return {"method": method, "loader": loader, "hwm_reset": window.hwm_reset,
            "baseline": window.baseline, "end": end, "vm_hwm": end["VmHWM"],
            "peak_anon_sampled": sampler.peak_anon, "file_at_peak_anon": sampler.file_at_peak_anon,
            "peak_file_sampled": sampler.peak_file, "peak_rss_sampled": sampler.peak_rss,
            "samples": sampler.samples, "t_load_s": t_load, "t_merge_s": t_merge, "t_total_s": t_total,
            "saved_bytes": saved, "merged_keys": len(result.state_dict),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "calm_fast": calm_fast.__version__, "native": bool(calm_fast.NATIVE)}


def run_child(spec_path: Path, scratch: Path, method: str, loader: str, interval: float) -> dict:
    return harness.run_fresh(__spec__.name, ["--child", "--spec", str(spec_path), "--scratch", str(scratch),
                                        "--method", method, "--loader", loader, "--interval", str(interval)],
                             f"child {method}/{loader}")


# ---- report -------------------------------------------------------------------------------------
def derive(raw: dict, info: dict, tasks: int) -> dict:
    model = info["model_bytes"]
    base = raw["baseline"]
    above_hwm = raw["vm_hwm"] - base["VmRSS"]
    above_anon = raw["peak_anon_sampled"] - base["RssAnon"]
    return {**raw,
            "peak_above_baseline_mb": above_hwm / MB, "peak_above_baseline_x_model": above_hwm / model,
            "anon_above_baseline_mb": above_anon / MB, "anon_above_baseline_x_model": above_anon / model,
            "file_at_peak_anon_above_baseline_mb": (raw["file_at_peak_anon"] - base["RssFile"]) / MB,
            "peak_file_above_baseline_mb": (raw["peak_file_sampled"] - base["RssFile"]) / MB,
            "peak_file_above_baseline_x_model": (raw["peak_file_sampled"] - base["RssFile"]) / model,
            "end_anon_above_baseline_mb": (raw["end"]["RssAnon"] - base["RssAnon"]) / MB,
            "end_file_above_baseline_mb": (raw["end"]["RssFile"] - base["RssFile"]) / MB,
            "theory_bytes": model + tasks * info["largest_param_bytes"]}


def markdown(payload: dict) -> str:
    info, meta = payload["workload"], payload["machine"]
    model_mb = info["model_bytes"] / MB
    theory_mb = (info["model_bytes"] + info["tasks"] * info["largest_param_bytes"]) / MB
    lines = [
        "# Peak host memory of a streamed data-free merge",
        "",
        f"- device: {meta['cpu']} ({meta['cpus']} CPUs), torch {meta['torch']} ({meta['torch_threads']} threads), "
        f"safetensors {meta['safetensors']}, calm_fast {meta['calm_fast']} (native ops: {meta['native']}), "
        f"Linux {meta['kernel']}",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; git {meta.get('git') or 'unknown'}",
        f"- workload: T = {info['tasks']} fine-tuned + 1 pretrained checkpoint, one .safetensors file each; "
        f"ViT-like fp32, width {info['width']}, {info['blocks']} blocks, {info['num_tensors']} tensors, "
        f"model {model_mb:.1f} MB, largest parameter {info['largest_param_bytes'] / MB:.1f} MB "
        f"(1/{info['model_bytes'] / info['largest_param_bytes']:.0f} of the model)",
        f"- reference: 1 model + T x largest parameter = {theory_mb:.1f} MB "
        f"({theory_mb / model_mb:.2f} x model); all T+1 models = {(info['tasks'] + 1) * model_mb:.0f} MB "
        f"({info['tasks'] + 1} x model)",
        "- MB = 2^20 bytes; each row: a fresh process; baseline = RSS after importing torch + calm_fast and a tiny warm-up "
        "merge; window = load (eager rows) + `calm_fast.merge(..., device=\"cpu\")` + `result.save()`",
        "",
        "| method | loader | peak RSS (VmHWM) above baseline, MB | × model | peak anon above baseline, MB | × model "
        "| file-backed RSS at anon peak, MB | peak file-backed RSS, MB | × model | end anon / file, MB "
        "| load s | merge s | save s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        save_s = r["t_total_s"] - r["t_load_s"] - r["t_merge_s"]
        lines.append(
            f"| {r['method']} | {r['loader']} | {r['peak_above_baseline_mb']:.0f} | {r['peak_above_baseline_x_model']:.2f} "
            f"| {r['anon_above_baseline_mb']:.0f} | {r['anon_above_baseline_x_model']:.2f} "
            f"| {r['file_at_peak_anon_above_baseline_mb']:.0f} | {r['peak_file_above_baseline_mb']:.0f} "
            f"| {r['peak_file_above_baseline_x_model']:.2f} "
            f"| {r['end_anon_above_baseline_mb']:.0f} / {r['end_file_above_baseline_mb']:.0f} "
            f"| {r['t_load_s']:.2f} | {r['t_merge_s']:.2f} | {save_s:.2f} |")
    lines += [
        "",
        "Loaders: **lazy** = checkpoint paths given to calm_fast.merge (LazyStateDict over safe_open); "
        "**load_file** = the T+1 state dicts from safetensors.torch.load_file, in memory before the merge; "
        "**copy** = load_file + clone of every tensor (weights in anonymous memory, as torch.load without "
        "mmap gives).",
        "",
        "Columns: *peak RSS (VmHWM)* is the kernel's peak resident set after resetting it "
        "(/proc/self/clear_refs) at the start of the window, file-backed pages included; *peak anon* is the "
        f"highest RssAnon seen by a sampler thread polling /proc/self/status every ~{payload['interval_s'] * 1e3:.0f} ms "
        "(the memory the merge allocates itself); *file-backed RSS* is RssFile: pages of the mapped "
        "checkpoint files, clean page cache the kernel can reclaim without swap, which RSS tools still count.",
    ]
    if payload.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"


def notes_for(rows: list[dict], info: dict) -> list[str]:
    tasks = info["tasks"]
    theory = (info["model_bytes"] + tasks * info["largest_param_bytes"]) / info["model_bytes"]
    notes = [f"{r['method']} (lazy): total RSS peak {r['peak_above_baseline_x_model']:.2f} x model, anonymous "
             f"{r['anon_above_baseline_x_model']:.2f} x (reference 1 model + T params = {theory:.2f} x; "
             f"all T+1 models = {tasks + 1} x)" for r in rows if r["loader"] == "lazy"]
    notes.append("The gap to the reference is allocator retention, not held tensors: glibc raises its mmap "
                 "threshold after the first large free, so later per-parameter buffers come from the heap and the "
                 "holes between the kept merged tensors are not returned. With MALLOC_MMAP_THRESHOLD_=131072 the "
                 "lazy rows measured 1.15-1.16 x model total (1.12 x anonymous) at 2-3x the wall time.")
    notes.append("load_file rows: safetensors returns views into a mapping of each whole file, so every page read "
                 "stays resident (file-backed, reclaimable, but counted by RSS tools) while the state dicts live. "
                 "calm_fast's LazyStateDict opens the file per tensor access for that reason.")
    return notes


def machine_info(first: dict) -> dict:
    import platform

    import safetensors

    return {"cpu": harness.cpu_model(), "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "torch": first["torch"], "torch_threads": first["torch_threads"],
            "safetensors": safetensors.__version__, "calm_fast": first["calm_fast"], "native": first["native"],
            "git": harness.git_sha(), "git_dirty": harness.git_dirty()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=None, help="fine-tuned models T (default 8; 6 with --quick)")
    p.add_argument("--model-mb", type=float, default=None, help="MiB per model (default 256; 64 with --quick)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    p.add_argument("--workdir", default=None, help="folder for the checkpoints (default: a temp dir, removed)")
    p.add_argument("--out", default=str(RESULTS), help="folder for stream_memory_cpu.json/.md")
    p.add_argument("--quick", action="store_true", help="smoke test: T=6, 64 MB models")
    p.add_argument("--interval", type=float, default=0.001, help="RssAnon sampling interval, seconds")
    p.add_argument("--seed", type=int, default=0)
    # child mode (internal)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--loader", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args, tasks: int, model_mb: float) -> tuple[dict, list[dict]]:
    """The checkpoints, then every (method, loader) in its own process: what was written, the rows."""
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="stream_memory_")) if own_workdir else Path(args.workdir)
    try:
        t0 = time.perf_counter()
        info = make_checkpoints(workdir / "checkpoints", tasks, model_mb, args.seed)
        info["tasks"] = tasks
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(info))
        print(f"wrote {tasks + 1} checkpoints of {info['model_bytes'] / MB:.1f} MB "
              f"(largest parameter {info['largest_param_bytes'] / MB:.1f} MB) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        rows = []
        for method in args.methods:
            for loader in args.loaders:
                row = derive(run_child(spec_path, workdir, method, loader, args.interval), info, tasks)
                rows.append(row)
                print(f"{method:16s} {loader:9s} peak RSS +{row['peak_above_baseline_mb']:7.0f} MB "
                      f"({row['peak_above_baseline_x_model']:.2f} x model)  anon +{row['anon_above_baseline_mb']:7.0f} MB "
                      f"({row['anon_above_baseline_x_model']:.2f} x)  file peak +{row['peak_file_above_baseline_mb']:7.0f} MB  "
                      f"{row['t_total_s']:.2f} s", flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return info, rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        harness.emit(child(args))
        return 0
    tasks = args.tasks if args.tasks is not None else (6 if args.quick else 8)
    model_mb = args.model_mb if args.model_mb is not None else (64 if args.quick else 256)
    info, rows = measure(args, tasks, model_mb)
    payload = {
        "benchmark": "stream_memory",
        "command": harness.command_line(__spec__.name, argv),
        "date": harness.utc_now(),
        "machine": machine_info(rows[0]),
        "workload": {k: v for k, v in info.items() if k not in ("pretrained", "task_paths")} | {"tasks": tasks},
        "interval_s": args.interval,
        "rows": rows,
        "notes": notes_for(rows, {**info, "tasks": tasks}),
    }
    out = Path(args.out)
    harness.write_results(out, "stream_memory_cpu", payload, markdown(payload))
    print(f"wrote {out / 'stream_memory_cpu.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
