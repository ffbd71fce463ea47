"""What the end-to-end benchmark concludes from its variants: the checks that (b) and (c) ran the
same algorithm on the same batches, the speed ratios, and the targets."""
from __future__ import annotations

import torch

from ..harness import GiB
from .problem import Problem, expected_batches
from .report import fmt
from .variants import compare_masks


def checks_for(variants: dict, problem: Problem, seed: int) -> dict:
    """Same batch sequence, same pseudo-label counts, masks and no-gradient keys of (a)/(b) vs (c)."""
    checks = {}
    c = variants.get("calm_fast")
    if c is None:
        return checks
    want = expected_batches(problem, seed)
    got = c["result"]["recorded_batches"]
    checks["batch_sequence_identical"] = len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))
    report_counts = c["result"]["pseudo_labels"]
    mine = {t: dict(zip(*[x.tolist() for x in torch.unique(lab, return_counts=True)]))
            for t, (_, lab) in problem.selected.items()}
    checks["pseudo_labels_match"] = report_counts == mine
    for v, name in (("b", "eager"), ("a", "authors")):
        if name in variants:
            cmp = compare_masks(c["result"]["masks"], variants[name]["result"]["masks"])
            checks[f"masks_{v}_vs_c"] = {t: f"{d['differ']} of {d['total']} differ ({d['on_ref']} on in (c))"
                                         for t, d in cmp.items()}
            checks[f"masks_{v}_vs_c_differ"] = sum(d["differ"] for d in cmp.values())
            checks[f"masks_{v}_vs_c_keys_missing"] = sum(len(d["keys_missing"]) for d in cmp.values())
    if "eager" in variants:
        checks["no_grad_keys_b_vs_c"] = variants["eager"]["result"]["no_grad_keys"] == c["result"]["no_grad_keys"]
    return checks


def ratios_for(variants: dict) -> dict:
    """(a) / (c) and (b) / (c) of the per-update, element-wise, mask phase and whole-run times."""
    def r(x, y):
        return x / y if y else None

    ratios, c = {}, variants.get("calm_fast")
    for other in ("authors", "eager"):
        if other in variants and c is not None:
            a, s = variants[other]["summary"], c["summary"]
            ratios[f"({'a' if other == 'authors' else 'b'}) {other} / (c) calm_fast"] = {
                "per_update": r(a["per_update_s"]["total_s"], s["per_update_s"]["total_s"]),
                "elementwise": r(a["per_update_s"]["elementwise_s"], s["per_update_s"]["elementwise_s"]),
                "mask_phase": r(a["mask_phase_s"], s["mask_phase_s"]),
                "whole_run": r(a["whole_run_s"], s["whole_run_s"]),
                "projected_full_schedule": r(a["projected_full_schedule_s"], s["projected_full_schedule_s"])}
    return ratios


def targets_for(args, device, variants: dict, ratios: dict) -> list[dict]:
    """The four targets, each with its measured value and met / NOT met / n/a."""
    c = variants.get("calm_fast")
    if c is None:
        return []
    frac = c["summary"]["elementwise_fraction"]
    targets = [{"name": "element-wise work <= 5 % of an update ((c))",
                "value": fmt(frac and 100 * frac, ".2f") + " %",
                "status": "n/a" if frac is None else ("met" if frac <= 0.05 else "NOT met")}]
    key = "(a) authors / (c) calm_fast"
    if key in ratios:
        val = ratios[key]["projected_full_schedule"]
        targets.append({"name": "whole run >= 5x faster than (a) (projected to the full schedule)",
                        "value": f"{fmt(val)}x (measured run: {fmt(ratios[key]['whole_run'])}x)",
                        "status": "n/a" if val is None else ("met" if val >= 5 else "NOT met")})
    name = "extra device memory <= 2 P beyond model + grads + activations ((c))"
    if device.type == "cuda":
        x = c["extra_device_x_param"]
        targets.append({"name": name, "value": f"{x:.2f} P ({c['extra_device_bytes'] / GiB:.2f} GiB)",
                        "status": "met" if x <= 2.0 else "NOT met"})
    else:
        targets.append({"name": name, "value": "no device memory on a CPU run", "status": "n/a"})
    large = args.config == "vit-h" or (args.model not in ("ViT-B-32", "ViT-L-14") and not args.vision_width)
    targets.append({"name": "a larger backbone (ViT-H-14 / ViT-bigG-14, bf16 δ + autocast) completes on one GPU",
                    "value": f"{args.model} completed on {device}" if large else "not this configuration (--config vit-h)",
                    "status": ("met" if device.type == "cuda" else "n/a (CPU)") if large else "n/a"})
    return targets
