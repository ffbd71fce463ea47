#!/usr/bin/env python
"""How the cost grows: CALM's and the data-free merges' time and memory against the task count T,
the model size N and the unlabeled pool size, measured, fitted and plotted.

    python benchmarks/scaling.py [--quick] [--device cpu|cuda] [--sweeps tasks size pool] [--threads N]
                                 [--out DIR] [--name STEM] [--workdir DIR]
    python benchmarks/scaling.py --render benchmarks/results/scaling_cpu.json   # redo .md/.png only

Sweeps (open_clip visual towers, random weights, scaled down for a CPU: 32 px images, few layers):
  tasks  T in {2, 4, 8, 16} on the ViT-B-class tower, pool 64: CALM, task arithmetic, TIES, TALL
  size   towers S / B / L (ViT-S-16, ViT-B-16 at 4 layers, ViT-L-14 at 6 layers) at T = 4, pool 64
  pool   unlabeled images per task in {32, 64, 256, 1024} on the S tower at T = 4: CALM only
--quick: the sweep at its smallest size (one tiny tower, T = 2, pool 16, one point per method);
tests/test_scaling_bench.py runs it.

Workload: the pretrained tower and T synthetic fine-tuned copies (benchmarks/e2e_calm.py's
synthetic_finetuned: dense noise + rank-4 changes) are written as safetensors to a temporary
folder; every merge reads them lazily from those paths (CALM too, with model= the tower). CALM
runs the sequential framework with one task merged by task arithmetic and the other T - 1 added
one by one (so a run of T tasks has steps with 2 .. T seen tasks), 3 updates per step, 1 batch
of 8 per seen task, e2e_calm.py's synthetic heads and images.

Each point runs in a fresh subprocess (`--child`): the peak RSS is the kernel's VmHWM after
resetting it (/proc/self/clear_refs) once imports, the tower, heads and pools are built, so it is
that point's alone; on a CPU each point runs at 1 thread (2 threads on 2 shared cores stalled
updates up to 10x whenever another job ran) and a step's update time is its fastest; glibc's mmap threshold is fixed at 1 MiB (as in e2e_calm.py) so that freed
parameter-sized buffers go back to the OS. Reported per point: wall time per phase (CALM: calm_fast's
own report, per step and per update: forward/backward vs element-wise), peak RSS above that baseline
(file-backed pages of mapped checkpoints included) and peak device memory (CUDA), in bytes and as
multiples of P = the merged parameters' bytes. For CALM a probe (one forward/backward of one batch
on the same tower) gives model gradients + activations; "extra" = the merge's peak minus the probe.

Fits: least squares on log-log data (numpy), time ∝ T^a · N^b · pool^c per method, and per CALM
update ∝ seen^a · T^b over every step; memory against T also as a straight line (P per task).
Claims checked with the numbers (see `claims` in the JSON and the markdown):
  1. CALM's extra memory does not grow with T (two parameter-sized buffers, S and δ, whatever T);
  2. a streamed data-free merge peaks at about one model + T parameters, not T models;
  3. CALM's time per update grows with the number of seen tasks and not with T otherwise.

Output: benchmarks/results/scaling_<device>.json, .md and .png (<device> = cpu or cuda-<gpu>).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

import stream_memory as sm  # noqa: E402  (benchmarks/stream_memory.py: /proc/self/status, peak reset, sampler)

MB = 2**20
METHODS = ("calm", "task_arithmetic", "ties", "consensus")
DATA_FREE = METHODS[1:]
LABELS = {"calm": "CALM", "task_arithmetic": "task arithmetic", "ties": "TIES", "consensus": "TALL"}
# open_clip towers, scaled down for a CPU: the model's own width and patch size, fewer layers, 32 px
TOWERS = {
    "XS": dict(model="ViT-S-16", vision_width=64, vision_layers=2),  # --quick only
    "S": dict(model="ViT-S-16", vision_width=None, vision_layers=4),
    "B": dict(model="ViT-B-16", vision_width=None, vision_layers=4),
    "L": dict(model="ViT-L-14", vision_width=None, vision_layers=6),
}
SWEEPS = {  # name -> (towers, task counts, pool sizes, methods)
    "tasks": (["B"], [2, 4, 8, 16], [64], METHODS),
    "size": (["S", "B", "L"], [4], [64], METHODS),
    "pool": (["S"], [4], [32, 64, 256, 1024], ("calm",)),
}
QUICK = {"tasks": (["XS"], [2], [16], METHODS), "size": (["XS"], [2], [16], METHODS),
         "pool": (["XS"], [2], [16], ("calm",))}
IMAGE_SIZE, CLASSES, BATCH, UPDATES, SEED = 32, 4, 8, 3, 0


# ---- the workload -----------------------------------------------------------------------------
def tower_args(tower: str) -> SimpleNamespace:
    """What e2e_calm.build_backbone reads."""
    return SimpleNamespace(**TOWERS[tower], patch_size=None, image_size=IMAGE_SIZE, seed=SEED,
                           grad_checkpointing=False)


def write_checkpoints(folder: Path, tower: str, tasks: int) -> dict:
    """pretrained.safetensors + task{i}.safetensors (i < tasks) of one tower; sizes of the model."""
    import torch
    from safetensors.torch import save_file

    import e2e_calm

    folder.mkdir(parents=True, exist_ok=True)
    theta0 = {k: v.detach().clone().contiguous() for k, v in e2e_calm.build_backbone(tower_args(tower)).state_dict().items()}
    save_file(theta0, str(folder / "pretrained.safetensors"))
    for i in range(tasks):  # one at a time; task i's seed does not depend on how many are written
        tuned = e2e_calm.synthetic_finetuned(theta0, [f"task{i}"], SEED + 1000 * i, noise=0.01, coord=0.1,
                                             coord_fraction=0.06, device=torch.device("cpu"))
        save_file({k: v.contiguous() for k, v in tuned[f"task{i}"].items()}, str(folder / f"task{i}.safetensors"))
        del tuned
    merged = {k: v for k, v in theta0.items() if v.is_floating_point()}
    return {"num_params": sum(v.numel() for v in merged.values()),
            "param_bytes": sum(v.numel() * v.element_size() for v in merged.values()),
            "largest_param_bytes": max(v.numel() * v.element_size() for v in merged.values()),
            "num_tensors": len(merged)}


# ---- one point, in a fresh process --------------------------------------------------------------
def memory_window_start(device) -> dict:
    """gc + malloc_trim, the baseline /proc/self/status, VmHWM reset, CUDA peak reset."""
    import torch

    sm.trim_heap()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    status = sm.read_status()
    return {"status": status, "hwm_reset": sm.reset_peak(),
            "device_start": torch.cuda.memory_allocated(device) if device.type == "cuda" else None}


def memory_window_end(start: dict, device, sampler=None) -> dict:
    """Peaks since memory_window_start: VmHWM (else sampled VmRSS) and RssAnon above the baseline."""
    import torch

    if sampler is not None:
        sampler.stop()
    end = sm.read_status()
    base = start["status"]
    peak = end["VmHWM"] if start["hwm_reset"] else max(end["VmRSS"], sampler.peak_rss if sampler else 0)
    out = {"baseline_rss_bytes": base["VmRSS"], "peak_rss_bytes": peak,
           "rss_peak_above_baseline_bytes": peak - base["VmRSS"],
           "rss_peak_source": "VmHWM after clear_refs" if start["hwm_reset"] else "sampled",
           "anon_peak_above_baseline_bytes": (sampler.peak_anon - base["RssAnon"]) if sampler else None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["device_start_bytes"] = start["device_start"]
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["device_peak_above_start_bytes"] = out["device_peak_bytes"] - start["device_start"]
    return out


@contextlib.contextmanager
def phase_log(events: list):
    """Record every phase calm_fast's CALM timer measures, in order: (name, seconds). The timer
    (calm_fast.calm._Timer, which synchronizes CUDA at the end of a phase) is wrapped, not changed."""
    from calm_fast import calm

    original = calm._Timer.phase

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        with original(self, name):
            yield
        events.append((name, time.perf_counter() - start))

    calm._Timer.phase = phase
    try:
        yield
    finally:
        calm._Timer.phase = original


def per_step(events: list, first_seen: int) -> list[dict]:
    """The phase events grouped by sequential step (a step starts at its mask_init)."""
    steps = []
    for name, seconds in events:
        if name == "mask_init":
            steps.append({"seen": first_seen + len(steps), "mask_init_s": seconds, "fwd_bwd_s": [],
                          "elementwise_s": [], "finalize_s": 0.0})
        elif steps and name == "forward_backward":
            steps[-1]["fwd_bwd_s"].append(seconds)
        elif steps and name == "mask_step":
            steps[-1]["elementwise_s"].append(seconds)
        elif steps and name == "mask_finalize":
            steps[-1]["finalize_s"] += seconds
    for s in steps:  # the step's fastest update: on a shared machine, the least disturbed one
        s["update_fwd_bwd_s"], s["update_elementwise_s"] = min(s["fwd_bwd_s"]), min(s["elementwise_s"])
        s["update_s"] = s["update_fwd_bwd_s"] + s["update_elementwise_s"]
    return steps


def child(spec: dict) -> dict:
    """Measure one (method, tower, T, pool) point; the result as a dict."""
    import torch
    import torch.nn.functional as F

    import calm_fast
    import e2e_calm
    from calm_fast import baselines

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cpu":
        e2e_calm.fix_malloc_mmap_threshold(1 << 20)
    folder, tasks = Path(spec["folder"]), [f"task{i}" for i in range(spec["tasks"])]
    pretrained = str(folder / "pretrained.safetensors")
    finetuned = {t: str(folder / f"{t}.safetensors") for t in tasks}
    out = {"loadavg_start": list(os.getloadavg())}
    if spec["method"] != "calm":
        tiny = {"w": torch.randn(64, 64), "b": torch.randn(64)}  # warm-up: extension, OpenMP pool
        calm_fast.merge(tiny, {f"t{i}": {k: v + 0.01 for k, v in tiny.items()} for i in range(3)},
                        method=spec["method"], device=device, progress=False)
        del tiny
        spent = {"thresholds": 0.0}
        original = baselines.ties_thresholds

        def timed_thresholds(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                spent["thresholds"] += time.perf_counter() - t0

        baselines.ties_thresholds = timed_thresholds
        start = memory_window_start(device)
        sampler = sm.Sampler(0.005)
        sampler.start()
        t0 = time.perf_counter()
        result = calm_fast.merge(pretrained, finetuned, method=spec["method"], device=device, progress=False)
        wall = time.perf_counter() - t0
        out["memory"] = memory_window_end(start, device, sampler)
        out["phases"] = {"merge_wall_s": wall, "thresholds_s": spent["thresholds"],
                         "merge_s": wall - spent["thresholds"]}
        out["merged_keys"] = len(result.state_dict)
    else:
        from safetensors.torch import load_file

        model = e2e_calm.build_backbone(tower_args(spec["tower"]))
        model.load_state_dict(load_file(pretrained))
        model.to(device)
        pools = e2e_calm.synthetic_pools(tasks, spec["pool"], CLASSES, IMAGE_SIZE, SEED)
        gen = torch.Generator().manual_seed(SEED + 99)
        heads = {t: e2e_calm.SyntheticHead(model.output_dim, CLASSES, gen).to(device).requires_grad_(False)
                 for t in tasks}
        with torch.no_grad():  # center each head on the pretrained features of its images
            for t in tasks:
                heads[t].mu.copy_(model(pools[t]["x"][:64].to(device)).float().mean(0))
        config = calm_fast.CALMConfig(initial=tuple(tasks[:1]), sequential=tuple(tasks[1:]), updates=spec["updates"],
                                      batches_per_task=1, batch_size=BATCH, sparsity=1e-3, score_batch_size=64)

        # probe: model gradients + activations of one forward/backward of one batch
        start = memory_window_start(device)
        for p in model.parameters():
            p.requires_grad_(True)
        for _ in range(2):
            x = pools[tasks[0]]["x"][:BATCH].to(device)
            y = torch.arange(BATCH, device=device) % CLASSES
            F.cross_entropy(heads[tasks[0]](model(x)), y).backward()
        out["probe"] = memory_window_end(start, device)
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
        del x, y

        events = []
        start = memory_window_start(device)
        sampler = sm.Sampler(0.005)
        sampler.start()
        t0 = time.perf_counter()
        with phase_log(events):
            result = calm_fast.merge(pretrained, finetuned, method="calm", model=model, heads=heads, data=pools,
                                     forward=lambda b: model(b["x"]), config=config, device=device, progress=False)
        wall = time.perf_counter() - t0
        out["memory"] = memory_window_end(start, device, sampler)
        sec = result.report.seconds
        steps = per_step(events, first_seen=2)
        out["phases"] = {"merge_wall_s": wall, **{f"{k}_s": v for k, v in sec.items()}}
        out["per_update"] = {k: sum(s[f"update_{k}"] for s in steps) / len(steps)
                             for k in ("fwd_bwd_s", "elementwise_s")}
        out["per_update"]["total_s"] = out["per_update"]["fwd_bwd_s"] + out["per_update"]["elementwise_s"]
        out["steps"] = steps
        out["pseudo_labels_kept"] = {t: sum(c.values()) for t, c in result.report.pseudo_labels.items()}
        out["mask_bytes"] = sum(b.numel() for step in result.masks.bits.values() for b in step.values())
    out["loadavg_end"] = list(os.getloadavg())
    out["torch_threads"] = torch.get_num_threads()
    return out


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {}))
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"scaling: point {spec} failed (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- derived numbers ------------------------------------------------------------------------------
def derive(row: dict) -> dict:
    """Memory as multiples of P, and the reference each claim compares with."""
    P, mem = row["param_bytes"], row["memory"]
    row["peak_rss_above_baseline_x_P"] = mem["rss_peak_above_baseline_bytes"] / P
    if mem.get("device_peak_above_start_bytes") is not None:
        row["device_peak_above_start_x_P"] = mem["device_peak_above_start_bytes"] / P
    if row["method"] == "calm":
        peak_key = "device_peak_above_start_bytes" if "device_peak_above_start_bytes" in mem else "rss_peak_above_baseline_bytes"
        probe = row["probe"][peak_key]
        row["probe_x_P"] = probe / P
        row["extra_x_P"] = (mem[peak_key] - probe) / P  # beyond model gradients + activations
        row["masks_x_P"] = row["mask_bytes"] / P  # the packed masks of the finished steps: 1/32 P each
        row["reference_x_P"] = 2.0 + row["masks_x_P"]  # S and δ, plus the packed masks
        row["extra_less_masks_x_P"] = row["extra_x_P"] - row["masks_x_P"]
        row["pool_bytes"] = row["T"] * row["pool"] * (3 * IMAGE_SIZE**2 * 4 + 8)  # images + row index
    else:  # one merged model + one parameter per task
        row["reference_x_P"] = 1.0 + row["T"] * row["largest_param_bytes"] / P
    return row


def fit_power(rows: list[dict], xs: list[str], y: str) -> dict | None:
    """log y = log c + Σ a_x log x by least squares; None where the points do not determine it."""
    import numpy as np

    pts = [r for r in rows if r.get(y) is not None and r[y] > 0 and all(r.get(x, 0) > 0 for x in xs)]
    if len(pts) < len(xs) + 1:
        return None
    A = np.array([[1.0] + [math.log(r[x]) for x in xs] for r in pts])
    b = np.array([math.log(r[y]) for r in pts])
    coef, _, rank, _ = np.linalg.lstsq(A, b, rcond=None)
    if rank < A.shape[1]:
        return None
    pred = A @ coef
    ss = float(((b - b.mean()) ** 2).sum())
    r2 = 1.0 - float(((b - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return {"y": y, "exponents": dict(zip(xs, map(float, coef[1:]))), "coefficient": float(math.exp(coef[0])),
            "r2": r2, "n": len(pts)}


def fit_line(rows: list[dict], x: str, y: str) -> dict | None:
    """y = intercept + slope·x by least squares."""
    import numpy as np

    pts = [r for r in rows if r.get(y) is not None]
    if len({r[x] for r in pts}) < 2:
        return None
    slope, intercept = np.polyfit([r[x] for r in pts], [r[y] for r in pts], 1)
    return {"y": y, "x": x, "slope": float(slope), "intercept": float(intercept), "n": len(pts)}


def fmt_fit(f: dict | None) -> str:
    if f is None:
        return "n/a (too few points)"
    if "slope" in f:
        return f"{f['intercept']:.2f} + {f['slope']:.3f}·{f['x']} (n={f['n']})"
    terms = " · ".join(f"{x}^{a:.2f}" for x, a in f["exponents"].items())
    return f"∝ {terms} (R² {f['r2']:.2f}, n={f['n']})"


def sweep_rows(rows, sweep, method=None):
    return [r for r in rows if sweep in r["sweeps"] and (method is None or r["method"] == method)]


def fits_for(rows: list[dict]) -> dict:
    """Every fit the report prints, keyed by a readable name."""
    fits = {}
    for m in METHODS:
        tr, sr, pr = sweep_rows(rows, "tasks", m), sweep_rows(rows, "size", m), sweep_rows(rows, "pool", m)
        fits[f"{m}: wall time vs T"] = fit_power(tr, ["T"], "wall_s")
        fits[f"{m}: wall time vs N"] = fit_power(sr, ["N"], "wall_s")
        fits[f"{m}: wall time vs T, N (all points)"] = fit_power([r for r in rows if r["method"] == m], ["T", "N"], "wall_s")
        fits[f"{m}: peak RSS above baseline (x P) vs T"] = fit_line(tr, "T", "peak_rss_above_baseline_x_P")
        if m == "calm":
            fits["calm: extra memory beyond the probe (x P) vs T"] = fit_line(tr, "T", "extra_x_P")
            fits["calm: pseudo-labels time vs T"] = fit_power(tr, ["T"], "pseudo_labels_s")
            fits["calm: pseudo-labels time vs pool"] = fit_power(pr, ["pool"], "pseudo_labels_s")
            fits["calm: pseudo-labels time vs T, N, pool (all points)"] = fit_power(
                [r for r in rows if r["method"] == m], ["T", "N", "pool"], "pseudo_labels_s")
            fits["calm: per update vs pool"] = fit_power(pr, ["pool"], "update_s")
            fits["calm: element-wise per update vs N"] = fit_power(sr, ["N"], "elementwise_s")
            steps = [{"seen": s["seen"], "T": r["T"], "update_s": s["update_s"], "fwd_bwd_s": s["update_fwd_bwd_s"],
                      "elementwise_s": s["update_elementwise_s"], "finalize_s": s["finalize_s"]}
                     for r in tr for s in r["steps"]]
            for y in ("update_s", "fwd_bwd_s", "elementwise_s", "finalize_s"):
                fits[f"calm: {y[:-2]} per step's update vs seen, T (every step of the T sweep)"] = \
                    fit_power(steps, ["seen", "T"], y)
    return fits


def listing(values, spec=".2f") -> str:
    return ", ".join(format(v, spec) for v in values)


def claims_for(rows: list[dict], fits: dict) -> list[dict]:
    """The three claims, each confirmed or refuted by the measured numbers (None: too few points)."""
    out = []
    calm = sorted(sweep_rows(rows, "tasks", "calm"), key=lambda r: r["T"])
    if len(calm) >= 2:
        extra, buffers = [r["extra_x_P"] for r in calm], [r["extra_less_masks_x_P"] for r in calm]
        line = fits["calm: extra memory beyond the probe (x P) vs T"]
        ok = max(buffers) - min(buffers) <= 0.5 and all(1.5 <= b <= 2.5 for b in buffers) and line["slope"] <= 0.1
        out.append({"claim": "CALM's extra memory does not grow with T (two parameter-sized buffers whatever T)",
                    "confirmed": ok,
                    "evidence": f"peak beyond model gradients + activations at T = {[r['T'] for r in calm]}: "
                                f"{listing(extra)} P, of which the packed masks of the finished steps (1/32 P per "
                                f"sequential step, here T − 1 steps) are {listing(r['masks_x_P'] for r in calm)} P, "
                                f"leaving {listing(buffers)} P for S and δ (reference 2 P); fitted slope "
                                f"{line['slope']:+.3f} P per task, where holding the T models would add 1 P per task"})
    lines = []
    ok = True
    for m in DATA_FREE:
        mr = sorted(sweep_rows(rows, "tasks", m), key=lambda r: r["T"])
        if len(mr) < 2:
            continue
        line = fits[f"{m}: peak RSS above baseline (x P) vs T"]
        worst = max(r["peak_rss_above_baseline_x_P"] - r["reference_x_P"] for r in mr)
        ok = ok and worst <= 0.5 and line["slope"] <= 0.25
        lines.append(f"{LABELS[m]} {listing(r['peak_rss_above_baseline_x_P'] for r in mr)} P "
                     f"(slope {line['slope']:+.3f} P per task)")
    if lines:
        mr = sorted(sweep_rows(rows, "tasks", DATA_FREE[0]), key=lambda r: r["T"])
        out.append({"claim": "a streamed data-free merge peaks at about one model + T parameters, not T models",
                    "confirmed": ok,
                    "evidence": f"peak RSS above baseline at T = {[r['T'] for r in mr]}: " + "; ".join(lines)
                                + f"; reference 1 model + T x largest parameter: "
                                  f"{listing(r['reference_x_P'] for r in mr)} P; T models: "
                                  f"{', '.join(str(r['T']) for r in mr)} P"})
    f = fits.get("calm: update per step's update vs seen, T (every step of the T sweep)")
    if f is not None:
        a, b = f["exponents"]["seen"], f["exponents"]["T"]
        fb = fits["calm: fwd_bwd per step's update vs seen, T (every step of the T sweep)"]
        out.append({"claim": "CALM's time per update grows with the number of seen tasks and not with T otherwise",
                    "confirmed": a >= 0.5 and abs(b) <= 0.15,
                    "evidence": f"per update ∝ seen^{a:.2f} · T^{b:+.2f} (R² {f['r2']:.2f}, {f['n']} steps); "
                                f"forward/backward alone ∝ seen^{fb['exponents']['seen']:.2f} · "
                                f"T^{fb['exponents']['T']:+.2f}"})
    return out


def notes_for(rows: list[dict], fits: dict) -> list[str]:
    """What else the numbers show, with the numbers."""
    notes = []
    tr = sorted(sweep_rows(rows, "tasks", "calm"), key=lambda r: r["T"])
    f = fits.get("calm: finalize per step's update vs seen, T (every step of the T sweep)")
    if tr and f is not None:
        big = tr[-1]
        notes.append(f"CALM's finalize rebuilds each parameter from θ0, the initial task vectors and every finished "
                     f"step (calm.merged_parameter, which keeps replay bit-identical), so one step's finalize grows "
                     f"with the steps already done (∝ seen^{f['exponents']['seen']:.2f} · T^{f['exponents']['T']:+.2f}) "
                     f"and a run of T − 1 steps has a T² term: {big['phases']['mask_finalize_s']:.1f} s of "
                     f"{big['wall_s']:.1f} s at T = {big['T']}.")
    pr = sorted(sweep_rows(rows, "pool", "calm"), key=lambda r: r["pool"])
    if len(pr) >= 2:
        lo, hi = pr[0], pr[-1]
        grown = (hi["extra_x_P"] - lo["extra_x_P"]) * hi["param_bytes"]
        notes.append(f"CALM's memory grows with the pool: extra {lo['extra_x_P']:.2f} P at pool {lo['pool']}, "
                     f"{hi['extra_x_P']:.2f} P at {hi['pool']} (+{grown / MB:.0f} MB, against "
                     f"{(hi['pool_bytes'] - lo['pool_bytes']) / MB:.0f} MB of the T pools themselves): "
                     "calm_fast.sampling.collect_pool copies each task's data (torch.cat, even of a single tensor), "
                     "so the unlabeled data is held twice.")
    return notes


# ---- report ----------------------------------------------------------------------------------------
def tower_text(towers: dict) -> str:
    return ", ".join(f"{t} = {c['model']}" + (f" width {c['vision_width']}" if c["vision_width"] else "")
                     + f" {c['vision_layers']} layers" for t, c in towers.items())


def markdown(payload: dict) -> str:
    meta, rows = payload["metadata"], payload["rows"]

    def order(r):
        return list(SWEEPS).index(r["sweeps"][0])

    lines = [f"# How the cost grows: CALM and the data-free merges against T, model size and pool size ({meta['device']})", "",
             f"- command: `{payload['command']}` ({payload['total_s'] / 60:.1f} min)",
             f"- date {meta['date']}, git {meta['git']}{' (dirty)' if meta['git_dirty'] else ''}; torch {meta['torch']} "
             f"({meta['torch_threads']} thread(s) per point), open_clip_torch {meta['open_clip_torch']}, calm_fast backend "
             f"{meta['backend']}; {meta['cores']} cores, {meta['host_memory_gib']} GiB; load average (1/5/15 min) "
             f"at start {meta['loadavg_start']}, at end {meta['loadavg_end']} (shared machine: times are noisy, "
             "memory is not)",
             f"- workload: open_clip visual towers with random weights at {IMAGE_SIZE} px "
             f"({tower_text(payload['towers'])}); "
             "T synthetic fine-tuned copies as safetensors, every merge reading the paths lazily; CALM: 1 task by task "
             f"arithmetic, T − 1 sequential steps of {payload['updates']} updates x 1 batch of {BATCH} per seen task, "
             f"{CLASSES}-class synthetic heads; glibc mmap threshold fixed at 1 MiB in each point's process",
             "- P = bytes of the merged parameters (fp32); memory = peak RSS (VmHWM, file-backed pages included) above "
             "the point's baseline (its own fresh process after imports, tower, heads and pools); CALM's probe = one "
             "forward/backward of one batch (model gradients + activations); extra = CALM's peak − probe"
             + ("; device = torch.cuda.max_memory_allocated above the start" if meta["device_type"] == "cuda" else
                "; no device memory on a CPU run (the RSS is the device memory)"),
             "", "## CALM", "",
             "| sweep | tower | N (M) | P MB | T | pool | wall s | pseudo-labels s | initial merge s | mask init s "
             "| fwd/bwd per update ms | element-wise per update ms | finalize s | peak RSS MB | × P | probe × P "
             "| extra × P | reference (2 + masks) × P |" + (" device peak × P |" if meta["device_type"] == "cuda" else ""),
             "|" + "---|" * (18 + (meta["device_type"] == "cuda"))]
    for r in sorted((r for r in rows if r["method"] == "calm"), key=lambda r: (order(r), r["N"], r["T"], r["pool"])):
        ph, pu = r["phases"], r["per_update"]
        lines.append(f"| {', '.join(r['sweeps'])} | {r['tower']} | {r['N'] / 1e6:.1f} | {r['param_bytes'] / MB:.0f} | {r['T']} "
                     f"| {r['pool']} | {r['wall_s']:.1f} | {ph.get('pseudo_labels_s', 0):.2f} | {ph.get('initial_merge_s', 0):.2f} "
                     f"| {ph.get('mask_init_s', 0):.2f} | {pu['fwd_bwd_s'] * 1e3:.0f} | {pu['elementwise_s'] * 1e3:.0f} "
                     f"| {ph.get('mask_finalize_s', 0):.2f} | {r['memory']['rss_peak_above_baseline_bytes'] / MB:.0f} "
                     f"| {r['peak_rss_above_baseline_x_P']:.2f} | {r['probe_x_P']:.2f} | {r['extra_x_P']:.2f} "
                     f"| {r['reference_x_P']:.2f} |" + (f" {r.get('device_peak_above_start_x_P', 0):.2f} |"
                                                         if meta["device_type"] == "cuda" else ""))
    steps = [(r["T"], s) for r in sorted(sweep_rows(rows, "tasks", "calm"), key=lambda r: r["T"]) for s in r["steps"]]
    if steps:
        lines += ["", "CALM per sequential step (T sweep; the fastest of the step's updates, ms): "
                  + "; ".join(f"T={t} seen {s['seen']}: {s['update_fwd_bwd_s'] * 1e3:.0f} + {s['update_elementwise_s'] * 1e3:.0f}"
                              for t, s in steps) + " (forward/backward + element-wise)."]
    lines += ["", "## Data-free merges, streamed from checkpoint paths", "",
              "| sweep | method | tower | N (M) | P MB | T | wall s | TIES thresholds s | peak RSS MB | × P "
              "| reference 1 + T·largest/P | T models × P |" + (" device peak × P |" if meta["device_type"] == "cuda" else ""),
              "|" + "---|" * (12 + (meta["device_type"] == "cuda"))]
    for r in sorted((r for r in rows if r["method"] != "calm"),
                    key=lambda r: (order(r), METHODS.index(r["method"]), r["N"], r["T"])):
        lines.append(f"| {', '.join(r['sweeps'])} | {LABELS[r['method']]} | {r['tower']} | {r['N'] / 1e6:.1f} "
                     f"| {r['param_bytes'] / MB:.0f} | {r['T']} | {r['wall_s']:.2f} | {r['phases']['thresholds_s']:.2f} "
                     f"| {r['memory']['rss_peak_above_baseline_bytes'] / MB:.0f} | {r['peak_rss_above_baseline_x_P']:.2f} "
                     f"| {r['reference_x_P']:.2f} | {r['T']} |" + (f" {r.get('device_peak_above_start_x_P', 0):.2f} |"
                                                                   if meta["device_type"] == "cuda" else ""))
    lines += ["", "## Fitted growth (least squares on log-log data; memory against T as a line, in P)", ""]
    lines += [f"- {name}: {fmt_fit(f)}" for name, f in payload["fits"].items() if f is not None] or [
        "- none: each sweep here has a single point"]
    lines += ["", "## Claims", ""]
    if not payload["claims"]:
        lines.append("- not evaluated: each sweep here has a single point")
    for c in payload["claims"]:
        lines.append(f"- **{'confirmed' if c['confirmed'] else 'REFUTED'}**: {c['claim']}. {c['evidence']}.")
    if payload.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in payload["notes"]]
    if payload.get("plot"):
        lines += ["", f"![scaling]({payload['plot']})"]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> bool:
    """Six log-log panels: time and memory against T and against N, CALM's update against seen
    tasks, CALM's phases against the pool size; fitted exponents in the legends."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, ScalarFormatter
    except ImportError:
        return False
    rows, fits, grid = payload["rows"], payload["fits"], payload["grid"]
    colors = {"calm": "C0", "task_arithmetic": "C1", "ties": "C2", "consensus": "C3"}
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))

    def exponent(name, x):
        f = fits.get(name)
        return f" (∝ {x}^{f['exponents'][x]:.2f})" if f else ""

    def series(a, sweep, x, y, method, marker="o", **kw):
        pts = sorted(sweep_rows(rows, sweep, method), key=lambda r: r[x])
        if pts:
            a.plot([r[x] for r in pts], [y(r) for r in pts], marker=marker, color=colors[method], **kw)
        return pts

    def where(sweep):
        g = grid.get(sweep, {})
        return ", ".join(f"{k} {v[0]}" for k, v in (("tower", g.get("towers")), ("T =", g.get("tasks")),
                                                      ("pool", g.get("pools"))) if v and len(v) == 1)

    def plain(a, axis, ticks=None, fmt=None):  # readable tick labels on a log axis
        target = a.xaxis if axis == "x" else a.yaxis
        if ticks:
            target.set_major_locator(FixedLocator(sorted(ticks)))
        target.set_major_formatter(FuncFormatter(fmt) if fmt else ScalarFormatter())
        target.set_minor_formatter(NullFormatter())

    T_values = sorted({r["T"] for r in sweep_rows(rows, "tasks")}) or [2]
    a = ax[0, 0]
    for m in METHODS:
        series(a, "tasks", "T", lambda r: r["wall_s"], m,
               label=f"{LABELS[m]}: whole merge" + exponent(f"{m}: wall time vs T", "T"))
    series(a, "tasks", "T", lambda r: r["per_update"]["total_s"], "calm", "s", ls="--", label="CALM: one update (mean)")
    series(a, "tasks", "T", lambda r: r["phases"].get("pseudo_labels_s", 0), "calm", "^", ls=":",
           label="CALM: pseudo-labels" + exponent("calm: pseudo-labels time vs T", "T"))
    a.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="seconds", title=f"time vs T ({where('tasks')})")
    plain(a, "x", T_values)
    a = ax[0, 1]
    pts = []
    for m in DATA_FREE:
        pts = series(a, "tasks", "T", lambda r: r["peak_rss_above_baseline_x_P"], m, label=f"{LABELS[m]}: peak RSS")
    if pts:
        a.plot([r["T"] for r in pts], [r["reference_x_P"] for r in pts], color="gray", ls="--",
               label="1 model + T × largest parameter")
        a.plot([r["T"] for r in pts], [r["T"] for r in pts], color="black", ls=":", label="T models")
    series(a, "tasks", "T", lambda r: r["peak_rss_above_baseline_x_P"], "calm", "s", ls="--",
           label="CALM: peak RSS (grads + activations + extra)")
    series(a, "tasks", "T", lambda r: r["extra_x_P"], "calm", label="CALM: extra (peak − probe)")
    series(a, "tasks", "T", lambda r: r["extra_less_masks_x_P"], "calm", "v", ls=":", label="CALM: extra − packed masks")
    a.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="× P (merged parameter bytes)",
          title=f"peak memory above baseline vs T ({where('tasks')})")
    plain(a, "x", T_values)
    plain(a, "y", [1, 1.5, 2, 3, 4, 6, 8, 12, 16])
    a = ax[0, 2]
    calm_t = sorted(sweep_rows(rows, "tasks", "calm"), key=lambda r: r["T"])
    for i, r in enumerate(calm_t):
        a.plot([x["seen"] for x in r["steps"]], [x["update_s"] for x in r["steps"]], marker="o",
               color=plt.cm.viridis(i / max(len(calm_t) - 1, 1)), label=f"T = {r['T']}")
    f = fits.get("calm: update per step's update vs seen, T (every step of the T sweep)")
    a.set(xscale="log", yscale="log", xlabel="seen tasks in the step", ylabel="seconds per update (fastest of the step)",
          title="CALM: time per update vs seen tasks" + (f"\nfit ∝ seen^{f['exponents']['seen']:.2f} · T^"
                                                         f"{f['exponents']['T']:+.2f}" if f else ""))
    plain(a, "x", [2, 4, 8, 16])
    a = ax[1, 0]
    for m in METHODS:
        series(a, "size", "N", lambda r: r["wall_s"], m,
               label=f"{LABELS[m]}: whole merge" + exponent(f"{m}: wall time vs N", "N"))
    series(a, "size", "N", lambda r: r["per_update"]["elementwise_s"], "calm", "s", ls="--",
           label="CALM: element-wise per update" + exponent("calm: element-wise per update vs N", "N"))
    a.set(xscale="log", yscale="log", xlabel="merged parameters N", ylabel="seconds",
          title=f"time vs model size ({where('size')})")
    a = ax[1, 1]
    for m in METHODS:
        series(a, "size", "N", lambda r: r["peak_rss_above_baseline_x_P"], m, label=f"{LABELS[m]}: peak RSS")
    series(a, "size", "N", lambda r: r["extra_x_P"], "calm", "s", ls="--", label="CALM: extra (peak − probe)")
    a.set(xscale="log", xlabel="merged parameters N", ylabel="× P", title=f"peak memory above baseline vs model size "
                                                                          f"({where('size')})")
    a.set_ylim(bottom=0)
    a = ax[1, 2]
    series(a, "pool", "pool", lambda r: r["phases"].get("pseudo_labels_s", 0), "calm",
           label="CALM: pseudo-labels" + exponent("calm: pseudo-labels time vs pool", "pool"))
    series(a, "pool", "pool", lambda r: r["per_update"]["total_s"], "calm", "s", ls="--",
           label="CALM: one update (mean)" + exponent("calm: per update vs pool", "pool"))
    series(a, "pool", "pool", lambda r: r["wall_s"], "calm", "^", ls=":", label="CALM: whole merge")
    a.set(xscale="log", yscale="log", xlabel="unlabeled images per task", ylabel="seconds",
          title=f"CALM: time vs pool size ({where('pool')})")
    plain(a, "x", sorted({r["pool"] for r in sweep_rows(rows, "pool")}) or [1])
    millions = sorted({r["N"] for r in sweep_rows(rows, "size")}) or [1e6]
    for a in (ax[1, 0], ax[1, 1]):
        plain(a, "x", millions, lambda x, _: f"{x / 1e6:.1f} M")
    for a in (ax[0, 0], ax[0, 2], ax[1, 0], ax[1, 2]):
        plain(a, "y", fmt=lambda y, _: f"{y:g}")
    for a in ax.flat:
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    m = payload["metadata"]
    fig.suptitle(f"calm_fast scaling on {m['device']}, {m['torch_threads']} thread(s) per point "
                 f"(load average {m['loadavg_start'][0]:.1f}: times are noisy, memory is not)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def metadata(device: str) -> dict:
    import importlib.metadata

    import torch

    import calm_fast
    from calm_fast import ops
    from machine import command_output, cpu_model

    dev = torch.device(device)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
            "device_type": dev.type, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "host_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "open_clip_torch": importlib.metadata.version("open_clip_torch"), "calm_fast": calm_fast.__version__,
            "backend": ops.resolve_backend(dev),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git": command_output(["git", "rev-parse", "--short", "HEAD"]),
            "git_dirty": bool(command_output(["git", "status", "--porcelain", "--", "calm_fast", "csrc", "kernels"])),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def points(sweeps: dict) -> list[dict]:
    """The distinct (method, tower, T, pool) points, each with the sweeps it belongs to."""
    out = {}
    for name, (towers, task_counts, pools, methods) in sweeps.items():
        for tower in towers:
            for T in task_counts:
                for pool in pools:
                    for m in methods:
                        out.setdefault((m, tower, T, pool), []).append(name)
    return [{"method": m, "tower": tw, "T": T, "pool": p, "sweeps": s} for (m, tw, T, p), s in out.items()]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the sweep at its smallest size (CI smoke test)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    ap.add_argument("--sweeps", nargs="+", choices=sorted(SWEEPS), default=list(SWEEPS))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch / OpenMP threads per point (default 1 on CPU: on a shared machine 2 threads on 2 "
                         "cores stall up to 10x when another job runs; torch's default on CUDA)")
    ap.add_argument("--updates", type=int, default=None, help=f"updates per sequential step (default {UPDATES}; 2 with --quick)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default=None, help="output stem (default scaling_<device>)")
    ap.add_argument("--workdir", default=None, help="folder for the checkpoints (default: a temp dir, removed)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png beside a saved JSON (no measuring)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return {}
    if args.render:
        return write_report(json.loads(Path(args.render).read_text()), Path(args.render).parent,
                            Path(args.render).stem)
    argv = list(sys.argv[1:] if argv is None else argv)

    import torch

    import e2e_calm
    from open_clip_compat import import_open_clip

    import_open_clip()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    updates = args.updates or (2 if args.quick else UPDATES)
    threads = args.threads or (1 if device == "cpu" else None)
    grid = {k: v for k, v in (QUICK if args.quick else SWEEPS).items() if k in args.sweeps}
    todo = points(grid)
    meta = metadata(device)
    meta["torch_threads"] = threads or meta["torch_threads"]
    t_start = time.perf_counter()
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="scaling_")) if own else Path(args.workdir)
    rows = []
    try:
        towers = {}  # tower -> (folder, sizes): pretrained + the most tasks any point needs
        for tower in sorted({p["tower"] for p in todo}, key=list(TOWERS).index):
            most = max(p["T"] for p in todo if p["tower"] == tower)
            t0 = time.perf_counter()
            towers[tower] = (workdir / tower, write_checkpoints(workdir / tower, tower, most))
            sm.trim_heap()
            print(f"tower {tower}: {towers[tower][1]['num_params'] / 1e6:.1f} M parameters, {most} fine-tuned "
                  f"checkpoints written in {time.perf_counter() - t0:.1f} s", flush=True)
        for i, p in enumerate(todo):
            folder, sizes = towers[p["tower"]]
            spec = {"method": p["method"], "tower": p["tower"], "tasks": p["T"], "pool": p["pool"],
                    "updates": updates, "device": device, "folder": str(folder), "threads": threads}
            raw = run_child(spec)
            row = derive({**p, **sizes, **raw, "N": sizes["num_params"], "updates": updates,
                          "wall_s": raw["phases"]["merge_wall_s"]})
            if p["method"] == "calm":
                row["pseudo_labels_s"] = row["phases"].get("pseudo_labels_s")
                row["update_s"], row["elementwise_s"] = row["per_update"]["total_s"], row["per_update"]["elementwise_s"]
            rows.append(row)
            print(f"[{i + 1}/{len(todo)}] {LABELS[p['method']]:15s} tower {p['tower']:2s} T={p['T']:2d} pool={p['pool']:4d}: "
                  f"{row['wall_s']:6.2f} s, peak RSS +{row['memory']['rss_peak_above_baseline_bytes'] / MB:6.0f} MB = "
                  f"{row['peak_rss_above_baseline_x_P']:.2f} P" + (f" (extra {row['extra_x_P']:.2f} P)" if "extra_x_P" in row else "")
                  + f"  load {raw['loadavg_start'][0]:.1f}", flush=True)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    stem = args.name or f"scaling_{e2e_calm.device_slug(torch.device(device))}"
    payload = {"benchmark": "scaling", "metadata": meta,
               "command": shlex.join(["python", "benchmarks/scaling.py", *argv]),
               "total_s": time.perf_counter() - t_start, "quick": args.quick, "updates": updates,
               "towers": {t: TOWERS[t] for t in sorted({r["tower"] for r in rows}, key=list(TOWERS).index)},
               "grid": {k: {"towers": v[0], "tasks": v[1], "pools": v[2], "methods": list(v[3])} for k, v in grid.items()},
               "rows": rows}
    return write_report(payload, Path(args.out), stem)


def write_report(payload: dict, out: Path, stem: str) -> dict:
    """Fits and claims (recomputed from the rows), then the .json, .md and .png; prints the fits."""
    payload["rows"] = [derive(r) for r in payload["rows"]]
    payload["fits"] = fits_for(payload["rows"])
    payload["claims"] = claims_for(payload["rows"], payload["fits"])
    payload["notes"] = notes_for(payload["rows"], payload["fits"]) + [
        f"Each point ran with {payload['metadata']['torch_threads']} torch/OpenMP thread(s); per step, the "
        "fastest of its updates is reported (the least disturbed by other jobs on a shared machine)."]
    out.mkdir(parents=True, exist_ok=True)
    payload["plot"] = f"{stem}.png" if plot(payload, out / f"{stem}.png") else None
    write_atomic(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(out / f"{stem}.md", markdown(payload))
    print("\n" + "\n".join(f"{name}: {fmt_fit(f)}" for name, f in payload["fits"].items() if f is not None))
    print("\n".join(f"{'confirmed' if c['confirmed'] else 'REFUTED'}: {c['claim']}. {c['evidence']}"
                    for c in payload["claims"]))
    print(f"wrote {out / stem}.json, .md" + (", .png" if payload["plot"] else ""))
    return payload


if __name__ == "__main__":
    main()
