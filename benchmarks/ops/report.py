"""The op benchmark's report: run metadata, targets, the slower-than-baseline notes, the markdown."""
from __future__ import annotations

import os
import re
import sys

import torch

from calm_fast import _extension

from .. import harness
from .sizes import human


def slug(device) -> str:
    """cuda-<gpu name>, or cpu-<cpu model>-<cores>c: the device part of the results files' names."""
    name = re.sub(r"[^a-z0-9]+", "-", harness.device_name(device).lower()).strip("-")
    if device.type == "cuda":
        return f"cuda-{name}"
    return f"cpu-{name}-{harness.cores()}c"


def metadata(args, argv, device, copy_gbps: list[float], loadavg: list[float]) -> dict:
    meta = harness.run_metadata(device)
    meta.update({
        "native_threads": (_extension.cpu_kernels.num_threads() if _extension.NATIVE else None),
        "native_cpu_isa": _extension.CPU_ISA,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "triton": harness.version("triton"),
        "numpy": harness.version("numpy"),
        "native": _extension.NATIVE,
        "native_cuda": _extension.NATIVE_CUDA,
        "native_load_error": _extension.LOAD_ERROR,
        "copy_gbps_start_end": [round(x, 2) for x in copy_gbps],
        "copy_gbps": round(max(copy_gbps), 2),
        "command": harness.command_line(__package__, argv),
        "python_executable": sys.executable,
        "quick": args.quick,
        "variants": list(args.variants),
        "loadavg_start_end": [round(x, 2) for x in loadavg],
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    })
    if device.type == "cuda":
        meta["cuda_runtime"] = torch.version.cuda
        smi = harness.nvidia_smi(device)
        meta["nvidia_smi"] = smi
        meta["cuda_driver"] = smi.split(",")[0].strip() if smi else None
        if meta["cuda_driver"] is None:
            try:
                meta["cuda_driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
            except Exception:  # noqa: BLE001
                pass
    return meta


def fmt_row(r: dict) -> str:
    if r.get("error"):
        return f"{r['op']:<20} {r['case']:<16} {r['variant']:<8} {human(r['size']):>8}  ERROR {r['error']}"
    sp = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else "-"
    return (f"{r['op']:<20} {r['case']:<16} {r['variant']:<8} {human(r['size']):>8} "
            f"{r['median_ms']:>10.3f} ms {r['gbps']:>8.1f} GB/s {100 * r['frac_copy']:>6.1f}% "
            f"{sp:>8}  {r['check'] or ''}")


def evaluate_targets(rows: list[dict], device) -> list[dict]:
    """Targets at the largest size of each (op, case)."""
    largest = {}
    for r in rows:
        key = (r["op"], r["case"])
        largest[key] = max(largest.get(key, 0), r["size"])
    out = []
    for r in rows:
        if r["size"] != largest[(r["op"], r["case"])] or r["variant"] not in ("native", "triton"):
            continue
        name = f"{r['op']} {r['case']} {r['variant']} @{human(r['size'])}"
        ok_run = r.get("median_ms") is not None
        sp = r.get("speedup_vs_eager") or 0.0
        fc = r.get("frac_copy") or 0.0
        if r["op"] == "magnitude_threshold":
            goal, met = ">= 5x torch.topk(cat)", ok_run and sp >= 5
            got = f"{sp:.2f}x"
        elif device.type == "cuda":
            goal, met = ">= 85% copy BW and >= 3x eager", ok_run and fc >= 0.85 and sp >= 3
            got = f"{100 * fc:.1f}%, {sp:.2f}x"
        else:
            goal, met = ">= 2x eager", ok_run and sp >= 2
            got = f"{sp:.2f}x"
        if not ok_run:
            got = "error"
        out.append(dict(target=name, goal=goal, got=got, met=bool(met)))
    return out


def slow_native(rows: list[dict]) -> list[str]:
    """Native/triton rows slower than eager or compile of the same case and size."""
    notes = []
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["case"], r["size"]), {})[r["variant"]] = r
    for (op, case, size), vs in by_key.items():
        for v in ("native", "triton"):
            r = vs.get(v)
            if not r or r.get("median_ms") is None:
                continue
            for other in ("eager", "compile"):
                o = vs.get(other)
                if o and o.get("median_ms") is not None and o["median_ms"] < r["median_ms"]:
                    notes.append(f"{op} {case} @{human(size)}: {v} {r['median_ms']:.3f} ms is slower "
                                 f"than {other} {o['median_ms']:.3f} ms")
    return notes




def _preamble(meta: dict) -> list[str]:
    lines = [f"# calm_fast op benchmarks: {meta['device']}", ""]
    keys = ["device", "cores", "torch_threads", "native_threads", "native_cpu_isa", "cpu_capability", "torch", "triton",
            "numpy", "python", "cuda_runtime", "cuda_driver", "copy_gbps", "copy_gbps_start_end",
            "loadavg_start_end", "git", "git_dirty", "date", "quick"]
    lines.append("; ".join(f"{k}: {meta[k]}" for k in keys if k in meta))
    if meta.get("partial"):
        lines += ["", "**Partial**: the run stopped before its last case; these are the cases it finished."]
    if meta["device_type"] == "cpu" and max(meta["loadavg_start_end"]) > 0.5 * meta["cores"]:
        lines += ["", f"**Noisy run**: 1-minute load average {meta['loadavg_start_end']} on {meta['cores']} "
                      "cores (other processes competed for the CPU). Variants were timed call by call "
                      "in turn, so ratios are fairer than absolute times; min ms is the least disturbed."]
    return lines + ["", f"Command: `{meta['command']}`", "",
                    "GB/s counts each op's minimal traffic (byte models in benchmarks/ops/__init__.py); "
                    "% copy = GB/s over the copy bandwidth measured in this run; x eager = speedup "
                    "over benchmarks/ops/eager.py in this run; check = output vs eager on the same inputs.", ""]


def markdown(meta: dict, rows: list[dict], targets: list[dict], notes: list[str]) -> str:
    lines = _preamble(meta) + harness.table_header(
        ["op", "case", "size", "variant", "median ms", "min ms", "GB/s", "% copy", "x eager", "check"], "    rrrrr")
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['op']} | {r['case']} | {r['shape']} | {r['variant']} | error | | | | | "
                         f"{r['error'][:80].replace('|', '/')} |")
            continue
        sp = f"{r['speedup_vs_eager']:.2f}" if r["speedup_vs_eager"] is not None else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | "
                     f"{r['min_ms']:.3f} | "
                     f"{r['gbps']:.1f} | {100 * r['frac_copy']:.1f} | {sp} | {r['check'] or ''} |")
    met = sum(t["met"] for t in targets)
    lines += ["", f"Targets: {met}/{len(targets)} met", ""]
    for t in targets:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['goal']} (got {t['got']})")
    if notes:
        lines += ["", "Kernels slower than eager or compile:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
