"""The scaling sweep's report: run metadata, the markdown tables, fits and claims; the JSON, .md
and .png written together."""
from __future__ import annotations

import os
from pathlib import Path

from .. import harness
from .fits import claims_for, derive, fits_for, fmt_fit, notes_for, sweep_rows
from .plot import plot
from .workload import BATCH, CLASSES, IMAGE_SIZE, LABELS, MB, METHODS, SWEEPS


def metadata(device: str) -> dict:
    import torch

    import calm_fast
    from calm_fast import ops

    meta = harness.run_metadata(device)
    meta.update({"host_memory_gib": harness.host_memory_gib(), "open_clip_torch": harness.version("open_clip_torch"),
                 "calm_fast": calm_fast.__version__, "backend": ops.resolve_backend(torch.device(device)),
                 "loadavg_start": [round(x, 2) for x in os.getloadavg()]})
    return meta


def tower_text(towers: dict) -> str:
    return ", ".join(f"{t} = {c['model']}" + (f" width {c['vision_width']}" if c["vision_width"] else "")
                     + f" {c['vision_layers']} layers" for t, c in towers.items())


def _order(r):
    return list(SWEEPS).index(r["sweeps"][0])


def _header(payload: dict) -> list[str]:
    meta = payload["metadata"]
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
    return lines


def _calm_table(payload: dict) -> list[str]:
    meta, rows, lines = payload["metadata"], payload["rows"], []
    for r in sorted((r for r in rows if r["method"] == "calm"), key=lambda r: (_order(r), r["N"], r["T"], r["pool"])):
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
    return lines


def _data_free_table(payload: dict) -> list[str]:
    meta, rows, lines = payload["metadata"], payload["rows"], []
    lines += ["", "## Data-free merges, streamed from checkpoint paths", "",
              "| sweep | method | tower | N (M) | P MB | T | wall s | TIES thresholds s | peak RSS MB | × P "
              "| reference 1 + T·largest/P | T models × P |" + (" device peak × P |" if meta["device_type"] == "cuda" else ""),
              "|" + "---|" * (12 + (meta["device_type"] == "cuda"))]
    for r in sorted((r for r in rows if r["method"] != "calm"),
                    key=lambda r: (_order(r), METHODS.index(r["method"]), r["N"], r["T"])):
        lines.append(f"| {', '.join(r['sweeps'])} | {LABELS[r['method']]} | {r['tower']} | {r['N'] / 1e6:.1f} "
                     f"| {r['param_bytes'] / MB:.0f} | {r['T']} | {r['wall_s']:.2f} | {r['phases']['thresholds_s']:.2f} "
                     f"| {r['memory']['rss_peak_above_baseline_bytes'] / MB:.0f} | {r['peak_rss_above_baseline_x_P']:.2f} "
                     f"| {r['reference_x_P']:.2f} | {r['T']} |" + (f" {r.get('device_peak_above_start_x_P', 0):.2f} |"
                                                                   if meta["device_type"] == "cuda" else ""))
    return lines


def markdown(payload: dict) -> str:
    lines = _header(payload) + _calm_table(payload) + _data_free_table(payload)
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
    harness.write_results(out, stem, payload, markdown(payload))
    print("\n" + "\n".join(f"{name}: {fmt_fit(f)}" for name, f in payload["fits"].items() if f is not None))
    print("\n".join(f"{'confirmed' if c['confirmed'] else 'REFUTED'}: {c['claim']}. {c['evidence']}"
                    for c in payload["claims"]))
    print(f"wrote {out / stem}.json, .md" + (", .png" if payload["plot"] else ""))
    return payload
