"""What a CALM run reports (pseudo-labels, order, densities, losses, step sizes, seconds per phase)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch


@dataclass
class CALMReport:
    tasks: list[str]
    initial: list[str] = field(default_factory=list)
    sequential: list[str] = field(default_factory=list)
    order_reason: str = ""
    agreement: dict[str, float] = field(default_factory=dict)  # order="auto": TA model vs pseudo-labels
    init_scaling: float | None = None  # the initial group's λ this run used
    scaling_agreement: list[list[float]] = field(default_factory=list)  # init_scaling="auto": [λ, agreement]
    trial_agreement: list[list[float]] = field(default_factory=list)  # init_scaling="trial": [λ, held-out agreement]
    pseudo_labels: dict[str, dict[int, int]] = field(default_factory=dict)  # task -> class -> kept
    pool_sizes: dict[str, int] = field(default_factory=dict)
    mask_density: dict[str, float] = field(default_factory=dict)  # step task -> kept fraction
    mask_density_per_parameter: dict[str, dict[str, float]] = field(default_factory=dict)
    no_grad_keys: dict[str, list[str]] = field(default_factory=dict)  # averaged 0.5 / 0.5
    losses: dict[str, list[float]] = field(default_factory=dict)  # step task -> loss per update
    step_sizes: dict[str, list[float]] = field(default_factory=dict)  # effective lr per update
    checks: dict[str, list[list[float]]] = field(default_factory=dict)  # holdout: step task -> [update, agreement]
    best_update: dict[str, int] = field(default_factory=dict)  # holdout: the update whose masks were kept
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, payload: dict) -> CALMReport:
        """The inverse of dataclasses.asdict after a JSON round trip (class ids back to int)."""
        payload = dict(payload)
        payload["pseudo_labels"] = {t: {int(c): n for c, n in counts.items()}
                                    for t, counts in payload["pseudo_labels"].items()}
        return cls(**payload)


class PhaseTimer:
    """Seconds per phase into the report; synchronizes CUDA so that async work is attributed."""

    def __init__(self, report: CALMReport, device: torch.device):
        self.report, self.device = report, device

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.report.seconds[name] = self.report.seconds.get(name, 0.0) + time.perf_counter() - start
