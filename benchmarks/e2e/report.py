"""The end-to-end benchmark's report: run metadata and the markdown beside the JSON."""
from __future__ import annotations

import statistics

import torch

from calm_fast import _extension, ops as cf_ops

from .. import harness
from ..harness import GiB
from ..open_clip_compat import torchvision_ops_stubbed
from .variants import FULL_UPDATES


def metadata(args, argv, device, loadavg: list[float]) -> dict:
    meta = harness.run_metadata(device)
    meta.update({
        "host_memory_gib": harness.host_memory_gib(),
        "triton": harness.version("triton"),
        "open_clip_torch": harness.version("open_clip_torch"),
        "torchvision": harness.version("torchvision"),
        "torchvision_ops_stubbed": torchvision_ops_stubbed(),
        "calm_fast_native": _extension.NATIVE,
        "calm_fast_native_cuda": _extension.NATIVE_CUDA,
        "calm_fast_backend": cf_ops.resolve_backend(device),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc dynamic",
        "loadavg_start_end": [round(x, 2) for x in loadavg],
        "command": harness.command_line(__package__, argv),
    })
    if device.type == "cuda":
        smi = harness.nvidia_smi(device)
        meta["nvidia_smi"] = smi
        meta["driver"] = smi.split(",")[0].strip() if smi else None
        meta["cuda_runtime"] = torch.version.cuda
        meta["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 1)
    else:
        meta["driver"] = None
    return meta


def fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def _header(payload: dict) -> list[str]:
    m, w = payload["metadata"], payload["workload"]
    pb = w["param_bytes"]
    return [f"# End-to-end CALM benchmark: {w['config']} on {m['device']}", "",
            f"Command: `{m['command']}`  ",
            f"Date {m['date']}, git {m['git']}{' (dirty)' if m['git_dirty'] else ''}; torch {m['torch']}, "
            f"triton {m['triton']}, open_clip_torch {m['open_clip_torch']}, torchvision {m['torchvision']}"
            f"{' (ops stubbed)' if m['torchvision_ops_stubbed'] else ''}; driver {m['driver']}; "
            f"{m['cores']} cores, {m['torch_threads']} torch threads; calm_fast backend {m['calm_fast_backend']}; "
            f"TF32 matmul {m['tf32_matmul']}; 1-min load average at start/end {m['loadavg_start_end']}.", "",
            f"Workload: open_clip {w['model']} visual tower (random weights), {w['num_params']:,} merged scalars "
            f"({pb / GiB:.3f} GiB fp32 = 1 P), {w['image_size']} px, {len(w['tasks'])} tasks "
            f"({len(w['initial'])} by task arithmetic, sequential {w['sequential']}), {w['updates']} updates x "
            f"{w['batches_per_task']} batches of {w['batch_size']} per seen task (authors: {FULL_UPDATES}), "
            f"delta {w['delta_dtype']}, autocast {w['autocast']} (variant a: always fp32, as the scripts), "
            f"step 'authors' (lr {w['lr']:g}).", ""]


def _variant_table(payload: dict) -> list[str]:
    lines = ["| variant | fwd/bwd ms/update | element-wise ms/update | element-wise % | update ms | "
             "mask phase s | whole run s | projected full schedule s | peak device GiB | extra device (x P) | "
             "peak RSS GiB | RSS rise GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in payload["variants"].items():
        s, mem = r["summary"], r["memory"]
        pu = s["per_update_s"]
        lines.append(
            f"| {r['label']} | {pu['fwd_bwd_s'] * 1e3:.1f} | {pu['elementwise_s'] * 1e3:.1f} | "
            f"{fmt(s['elementwise_fraction'] and 100 * s['elementwise_fraction'], '.1f')} | {pu['total_s'] * 1e3:.1f} | "
            f"{s['mask_phase_s']:.2f} | {s['whole_run_s']:.2f} | {s['projected_full_schedule_s']:.1f} | "
            f"{fmt(mem.get('device_peak_bytes') and mem['device_peak_bytes'] / GiB)} | "
            f"{fmt(r.get('extra_device_x_param'))} | {mem['rss_peak_bytes'] / GiB:.2f} | "
            f"{mem['rss_peak_delta_bytes'] / GiB:.2f} |")
    lines.append("")
    lines.append("For (a), 'element-wise' is everything in an update but forward/backward: the CPU rebuild of θ, "
                 "uploads of θ and (per batch) τ_merged and τ_new, gradient copies down to the CPU, the CPU mask update. "
                 "Whole run: (c) is the calm_fast.merge() call (validation, pseudo-labels, initial merge, steps, output); "
                 "(a) and (b) add the shared pseudo-labelling time "
                 f"({payload['pseudo_label_s']:.2f} s, calm_fast.sampling on the same device) to their own run. "
                 "Projected: measured run + (100 − updates) x the measured mean update time of each step.")
    return lines


def _phases_probe_ratios(payload: dict) -> list[str]:
    rows, lines = payload["variants"], []
    if "calm_fast" in rows:
        ph = rows["calm_fast"]["phases"]
        lines.append("")
        lines.append("(c) calm_fast.merge() phases (its report, s): " + ", ".join(
            f"{k[:-2]} {v:.2f}" for k, v in ph.items() if k != "merge_wall_s")
            + f"; outside any phase (validation, pool collection, output copy) "
              f"{rows['calm_fast']['summary'].get('outside_phases_s', 0.0):.2f}.")
    lines.append("")
    if payload.get("probe"):
        p, pb = payload["probe"], payload["workload"]["param_bytes"]
        lines.append(f"Memory/time probe (model + grads + activations, 2 fwd/bwd of one batch): "
                     f"{p['seconds_per_batch'] * 1e3:.1f} ms per batch"
                     + (f", peak {p['device_peak_bytes'] / GiB:.2f} GiB = {p['device_peak_bytes'] / pb:.2f} P"
                        if 'device_peak_bytes' in p else "") + ".")
        lines.append("")
    if payload["ratios"]:
        lines.append("| ratio | per update | element-wise per update | mask phase | whole run | projected full schedule |")
        lines.append("|---|---|---|---|---|---|")
        for name, r in payload["ratios"].items():
            lines.append(f"| {name} | {fmt(r['per_update'])} | {fmt(r['elementwise'])} | {fmt(r['mask_phase'])} | "
                         f"{fmt(r['whole_run'])} | {fmt(r['projected_full_schedule'])} |")
        lines.append("")
    return lines


def _checks_targets(payload: dict) -> list[str]:
    ch = payload["checks"]
    lines = [f"Checks: (c) drew the same batch sequence as the replay used by (a)/(b): "
             f"{ch.get('batch_sequence_identical')}; masks (b) vs (c): {ch.get('masks_b_vs_c')}; "
             f"(a) vs (c): {ch.get('masks_a_vs_c')} (the scripts' initial mask takes k − 1 entries, strict >); "
             f"pseudo-label counts equal to (c)'s report: {ch.get('pseudo_labels_match')}.", "",
             "Targets (evaluated on this run; GPU targets are indicative only on a CPU):", ""]
    for t in payload["targets"]:
        lines.append(f"- {t['name']}: {t['value']} -> {t['status']}")
    return lines


def _syncs_internals(payload: dict) -> list[str]:
    lines = []
    cf = payload["variants"].get("calm_fast")
    if cf is not None and cf.get("syncs_total") is not None:
        per = [u["syncs"] for u in cf["updates_detail"] if u.get("syncs") is not None]
        lines.append("")
        lines.append(f"(c) implicit device synchronizations (torch.cuda sync debug mode): {cf['syncs_total']} in the "
                     f"whole merge; per update {fmt(per and statistics.fmean(per), '.1f')} "
                     f"(host-to-device batch copies from pageable memory count as one each).")
    if payload.get("internals"):
        i = payload["internals"]
        lines.append("")
        lines.append(f"calm_fast internals per update ({i['tensors']} tensors, backend {i['backend']}): fused mask_step_ "
                     f"sweep {i['mask_step_sweep_ms']:.2f} ms ({i['mask_step_effective_gbps']:.1f} GB/s of the minimal "
                     f"traffic), normalized step_size {i['step_size_normalized_ms']:.2f} ms, eager (b) sweep "
                     f"{i['eager_sweep_ms']:.2f} ms, dispatch only (1-element tensors) {i['dispatch_only_ms']:.2f} ms"
                     + (f"; syncs: step_size {i.get('step_size_normalized_syncs')}, mask_step_ sweep "
                        f"{i.get('mask_step_sweep_syncs')}; extra device bytes: step_size "
                        f"{i.get('step_size_normalized_extra_device_bytes')}, mask_step_ sweep "
                        f"{i.get('mask_step_sweep_extra_device_bytes')}" if "mask_step_sweep_syncs" in i else "") + ".")
    return lines


def markdown(payload: dict) -> str:
    lines = (_header(payload) + _variant_table(payload) + _phases_probe_ratios(payload) + _checks_targets(payload)
             + _syncs_internals(payload))
    return "\n".join(lines) + "\n"
