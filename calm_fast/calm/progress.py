"""The progress file: each finished sequential step saved, so an interrupted run continues after it.

It is a mask file (maskfile.py) plus what continuing needs: the fingerprint of the run (what
must match), the report so far, the batch generator's state and the pseudo-labels.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .. import maskfile
from .report import CALMReport


@dataclasses.dataclass
class Resumed:
    bits: dict[str, dict[str, torch.Tensor]]  # finished step task -> key -> packed mask
    report: CALMReport
    generator_state: torch.Tensor
    selected: dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (kept rows, pseudo-labels)


def save(path: str, masks: maskfile.Masks, fingerprint: dict, report: CALMReport, generator: torch.Generator,
         selected: dict) -> None:
    resume = {"fingerprint": fingerprint, "planned": report.sequential, "report": dataclasses.asdict(report)}
    tensors = {"generator": generator.get_state()}
    for i, (keep, labels) in enumerate(selected.values()):
        tensors[f"keep.{i}"], tensors[f"labels.{i}"] = keep, labels
    maskfile.write(path, masks, resume, tensors)


def load(path: str | None, fingerprint: dict, tasks: list[str]) -> Resumed | None:
    """The saved state, if `path` exists and belongs to this run (else a clear error)."""
    if path is None or not os.path.exists(path):
        return None
    saved, resume, tensors = maskfile.read(path)
    if resume is None:
        raise ValueError(f"calm_fast: {path} is a mask file without resume state")
    before = resume["fingerprint"]
    differs = [name for name in dict.fromkeys([*fingerprint, *before]) if before.get(name) != fingerprint.get(name)]
    if differs == ["processes"]:
        raise ValueError(f"calm_fast: {path} was written by {before.get('processes', 1)} process(es), this run has "
                         f"{fingerprint['processes']}: resume it with the same world size (gradients summed "
                         "over another number of ranks round differently, and a run must end as one uninterrupted "
                         "run with its world size would)")
    if differs:
        raise ValueError(f"calm_fast: {path} belongs to another run ({', '.join(differs)} differ); delete it or "
                         "give another progress file")
    report = CALMReport.from_json(resume["report"])
    report.sequential = resume["planned"]
    selected = {t: (tensors[f"keep.{i}"], tensors[f"labels.{i}"]) for i, t in enumerate(tasks)}
    return Resumed(saved.bits, report, tensors["generator"], selected)
