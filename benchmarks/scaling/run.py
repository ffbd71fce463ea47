"""The scaling sweep's options and main: checkpoints per tower, one fresh process per point, report."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .. import harness
from . import __doc__ as DOC
from .fits import derive
from .point import child, run_child
from .report import metadata, write_report
from .workload import LABELS, MB, QUICK, SWEEPS, TOWERS, UPDATES, points, write_checkpoints

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=DOC.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the sweep at its smallest size (CI smoke test)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    ap.add_argument("--sweeps", nargs="+", choices=sorted(SWEEPS), default=list(SWEEPS))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch / OpenMP threads per point (default 1 on CPU: on a shared machine 2 threads on 2 "
                         "cores stall up to 10x when another job runs; torch's default on CUDA)")
    ap.add_argument("--updates", type=int, default=None, help=f"updates per sequential step (default {UPDATES}; 2 with --quick)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None, help="output stem (default scaling_<device>)")
    ap.add_argument("--workdir", default=None, help="folder for the checkpoints (default: a temp dir, removed)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png beside a saved JSON (no measuring)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def write_towers(todo: list[dict], workdir: Path) -> dict:
    """tower -> (folder, sizes): pretrained + the most tasks any point needs."""
    towers = {}
    for tower in sorted({p["tower"] for p in todo}, key=list(TOWERS).index):
        most = max(p["T"] for p in todo if p["tower"] == tower)
        t0 = time.perf_counter()
        towers[tower] = (workdir / tower, write_checkpoints(workdir / tower, tower, most))
        harness.trim_heap()
        print(f"tower {tower}: {towers[tower][1]['num_params'] / 1e6:.1f} M parameters, {most} fine-tuned "
              f"checkpoints written in {time.perf_counter() - t0:.1f} s", flush=True)
    return towers


def measure(p: dict, towers: dict, updates: int, device: str, threads) -> dict:
    """One point's row: measured in its own process, with the derived numbers."""
    folder, sizes = towers[p["tower"]]
    spec = {"method": p["method"], "tower": p["tower"], "tasks": p["T"], "pool": p["pool"],
            "updates": updates, "device": device, "folder": str(folder), "threads": threads}
    raw = run_child(spec)
    row = derive({**p, **sizes, **raw, "N": sizes["num_params"], "updates": updates,
                  "wall_s": raw["phases"]["merge_wall_s"]})
    if p["method"] == "calm":
        row["pseudo_labels_s"] = row["phases"].get("pseudo_labels_s")
        row["update_s"], row["elementwise_s"] = row["per_update"]["total_s"], row["per_update"]["elementwise_s"]
    return row


def sweep(args, device: str, updates: int, threads, grid: dict) -> list[dict]:
    """Every point of the grid, in order, printed as it finishes."""
    todo = points(grid)
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="scaling_")) if own else Path(args.workdir)
    rows = []
    try:
        towers = write_towers(todo, workdir)
        for i, p in enumerate(todo):
            row = measure(p, towers, updates, device, threads)
            rows.append(row)
            print(f"[{i + 1}/{len(todo)}] {LABELS[p['method']]:15s} tower {p['tower']:2s} T={p['T']:2d} pool={p['pool']:4d}: "
                  f"{row['wall_s']:6.2f} s, peak RSS +{row['memory']['rss_peak_above_baseline_bytes'] / MB:6.0f} MB = "
                  f"{row['peak_rss_above_baseline_x_P']:.2f} P" + (f" (extra {row['extra_x_P']:.2f} P)" if "extra_x_P" in row else "")
                  + f"  load {row['loadavg_start'][0]:.1f}", flush=True)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        harness.emit(child(json.loads(args.child)))
        return {}
    if args.render:
        return write_report(json.loads(Path(args.render).read_text()), Path(args.render).parent,
                            Path(args.render).stem)
    argv = list(sys.argv[1:] if argv is None else argv)

    import torch

    from ..open_clip_compat import import_open_clip

    import_open_clip()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    updates = args.updates or (2 if args.quick else UPDATES)
    threads = args.threads or (1 if device == "cpu" else None)
    grid = {k: v for k, v in (QUICK if args.quick else SWEEPS).items() if k in args.sweeps}
    meta = metadata(device)
    meta["torch_threads"] = threads or meta["torch_threads"]
    t_start = time.perf_counter()
    rows = sweep(args, device, updates, threads, grid)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    stem = args.name or f"scaling_{harness.device_slug(device)}"
    payload = {"benchmark": "scaling", "metadata": meta, "command": harness.command_line(__package__, argv),
               "total_s": time.perf_counter() - t_start, "quick": args.quick, "updates": updates,
               "towers": {t: TOWERS[t] for t in sorted({r["tower"] for r in rows}, key=list(TOWERS).index)},
               "grid": {k: {"towers": v[0], "tasks": v[1], "pools": v[2], "methods": list(v[3])} for k, v in grid.items()},
               "rows": rows}
    return write_report(payload, Path(args.out), stem)
