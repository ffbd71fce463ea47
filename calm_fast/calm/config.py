"""CALM's hyper-parameters: the authors' values, except the scale-free step and the initial λ."""
from __future__ import annotations

from dataclasses import dataclass

import torch

STEP_RULES = ("normalized", "authors")
ACCUMULATIONS = ("sum", "mean")
ORDERS = ("given", "auto")
REGULARIZERS = ("polarize", "l1", "none")
SCALING_MODES = ("auto", "trial")
AUTHORS_SCALING = 0.3  # the authors' λ for their six-task initial group
SCALING_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(1, 11))  # init_scaling="auto" picks one
SCALING_ROWS = 1024  # init_scaling="auto": pseudo-labels scored per initial task and candidate
TRIAL_FACTORS = (1.0, 1.5, 2.0, 2.5)  # init_scaling="trial": multiples of auto's λ, each tried with a short loop
TRIAL_HOLDOUT = 0.2  # init_scaling="trial": fraction of each task's training pseudo-labels the trials check on


@dataclass(frozen=True)
class CALMConfig:
    """Hyper-parameters; defaults are the authors' values except the scale-free step and the
    initial group's λ, chosen from its pseudo-labels (init_scaling="auto")."""

    initial: tuple[str, ...] | None = None  # tasks merged by task arithmetic (G0)
    sequential: tuple[str, ...] | None = None  # tasks added one by one with a learned mask
    order: str = "given"  # "auto": choose the sequential tasks from pseudo-label agreement
    num_sequential: int = 2  # how many sequential tasks when they are not named
    init_scaling: float | str = "auto"  # λ over G0; "auto": CALMMerger.choose_scaling; "trial": try_scalings
    ratio: float = 0.9  # CB-EMS: fraction of each predicted class kept
    balanced: bool = True  # False: plain EMS (lowest entropy over the whole task)
    sparsity: float = 1e-5  # initial mask: top-k of |τj|, k = floor(sparsity · N)
    sigmoid_bias: float = 5.0  # initial logits ±b
    updates: int = 100  # mask updates per sequential task
    batches_per_task: int = 2  # mini-batches per seen task in each update
    batch_size: int = 128
    step: str = "normalized"  # "normalized": lr is the RMS of the logit step; "authors": raw lr
    lr: float | None = None  # defaults: 1.0 (normalized), 1e7 (authors)
    reg: str = "polarize"  # the authors' sign(S)·σ'(S) term; "l1": true L1 on σ(S); "none"
    l1: float = 1.0
    accumulate: str = "sum"  # the authors sum gradients over an update's batches; or "mean"
    delta_dtype: torch.dtype = torch.float32
    autocast: bool = False  # bf16 autocast for forward/backward
    score_batch_size: int = 256
    holdout: float = 0.0  # fraction of each task's pseudo-labels the masks never train on, to check them
    check_every: int = 10  # with holdout: updates between checks of the held-out agreement
    patience: int | None = None  # with holdout: stop a step after this many checks without a better one
    trial_updates: int | None = None  # init_scaling="trial": updates per step of each trial loop; None: updates // 4

    @property
    def order_scaling(self) -> float:
        """λ of the all-task task arithmetic that order="auto" ranks the tasks by."""
        return AUTHORS_SCALING if self.init_scaling in SCALING_MODES else self.init_scaling

    @property
    def trial_length(self) -> int:
        """Updates per sequential step of each init_scaling="trial" loop."""
        return self.trial_updates if self.trial_updates is not None else max(1, self.updates // 4)

    @property
    def step_size(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 if self.step == "normalized" else 1e7

    def validate(self) -> None:
        def bad(field_name, value, allowed):
            raise ValueError(f"calm_fast: CALMConfig.{field_name} must be {allowed}, got {value!r}")

        for name, allowed in (("order", ORDERS), ("step", STEP_RULES), ("accumulate", ACCUMULATIONS),
                              ("reg", REGULARIZERS)):
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"one of {allowed}")
        if self.init_scaling not in SCALING_MODES and (isinstance(self.init_scaling, str) or self.init_scaling <= 0):
            bad("init_scaling", self.init_scaling, f"> 0 or one of {SCALING_MODES}")
        if not 0.0 < self.ratio <= 1.0:
            bad("ratio", self.ratio, "in (0, 1]")
        if not 0.0 <= self.holdout < 1.0:
            bad("holdout", self.holdout, "in [0, 1)")
        if self.patience is not None and self.patience < 1:
            bad("patience", self.patience, "None or >= 1")
        if not 0.0 <= self.sparsity <= 1.0:
            bad("sparsity", self.sparsity, "in [0, 1]")
        if self.delta_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            bad("delta_dtype", self.delta_dtype, "float32, bfloat16 or float16")
        for name in ("updates", "batches_per_task", "batch_size", "score_batch_size", "check_every"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), ">= 1")
        if self.trial_updates is not None and self.trial_updates < 1:
            bad("trial_updates", self.trial_updates, "None or >= 1")
        if self.step_size <= 0:
            bad("lr", self.lr, "> 0")
