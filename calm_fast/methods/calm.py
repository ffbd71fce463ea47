"""CALM: pseudo-labels by CB-EMS, the sequential framework, consensus-aware mask optimization
(calm_fast.calm). The one method that needs heads, unlabeled data and the architecture."""
from __future__ import annotations

import copy

import torch

from ..calm import CALMConfig, CALMMerger, check_model
from .base import Merged, MergeInputs, MergeMethod


class CALM(MergeMethod):
    name = "calm"
    config_class = CALMConfig
    needs_data = True
    summary = "consensus-aware localized masks learned from unlabeled data per task"

    def validate(self, config: CALMConfig, num_tasks: int) -> None:
        config.validate()

    def check_inputs(self, inputs: MergeInputs) -> None:
        self.architecture(inputs)

    @staticmethod
    def architecture(inputs: MergeInputs) -> torch.nn.Module:
        """A head and data for every task, and the architecture (`model`, else pretrained when
        that is a module) holding every merged key."""
        for what, given in (("heads", inputs.heads), ("data", inputs.data)):
            if given is None:
                raise ValueError(f"calm_fast: method 'calm' needs {what} for every task")
            missing = sorted(set(inputs.tuned) - set(given))
            if missing:
                raise ValueError(f"calm_fast: no {what[:-1] if what == 'heads' else what} for task(s) {missing}")
        model = inputs.model
        if model is None:
            if not isinstance(inputs.pretrained, torch.nn.Module):
                raise ValueError("calm_fast: method 'calm' needs `model` when pretrained is not an nn.Module")
            model = inputs.pretrained
        check_model(model, inputs.base, inputs.keys)
        return model

    def run(self, inputs: MergeInputs, config: CALMConfig) -> Merged:
        """CALM on `model`, else on a copy of pretrained (check_inputs has vouched for either)."""
        model = (copy.deepcopy(inputs.pretrained) if inputs.model is None else inputs.model).to(inputs.device)
        merger = CALMMerger(inputs.base, inputs.tuned, inputs.keys, model, inputs.heads, inputs.data, inputs.forward,
                            config, inputs.device, inputs.seed, inputs.progress, inputs.progress_file,
                            augment=inputs.augment)
        values, masks, report = merger.run()
        return Merged(values, masks, report)
