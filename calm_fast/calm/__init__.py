"""CALM: pseudo-labels by CB-EMS, the sequential framework, consensus-aware mask optimization.

One module per concept: config (hyper-parameters), report (what a run reports, timing),
weights (the merged tensors and how a merge is rebuilt), labels (stages 1 and 2), mask
(stage 3's pieces: initial mask, step size, update, finished masks), progress (resume),
layout (where this process's part of each tensor lives) and driver (CALMMerger, the stages in
order). State kept on the device for the step in flight, beyond the model and its gradients:
the mask logits S (fp32) and δ = τj − τ_merged (fp32 or bf16), one tensor of each per merged
parameter. The model's own tensors hold θ = base + σ(S)·δ throughout; base = θ0 + τ_merged is
never stored, because mask_step_ recovers it as θ − σ(S_old)·δ inside the fused sweep.
"""
from .config import ACCUMULATIONS, ORDERS, REGULARIZERS, STEP_RULES, CALMConfig
from .driver import CALMMerger
from .labels import auto_order, given_order, pseudo_labels
from .layout import Layout
from .mask import finished_masks, initial_logits, step_inputs, step_size, update
from .report import CALMReport, PhaseTimer
from .weights import check_model, default_forward, merged_parameter, trainable_tensors

__all__ = ["ACCUMULATIONS", "ORDERS", "REGULARIZERS", "STEP_RULES", "CALMConfig", "CALMMerger", "CALMReport",
           "Layout", "PhaseTimer", "auto_order", "check_model", "default_forward", "finished_masks", "given_order",
           "initial_logits", "merged_parameter", "pseudo_labels", "step_inputs", "step_size", "trainable_tensors",
           "update"]
