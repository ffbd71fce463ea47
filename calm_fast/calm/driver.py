"""CALMMerger: the three stages of CALM in order over one model, with resume after each step."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import torch

from .. import maskfile, ops, sampling
from ..checkpoint import spec
from . import labels, mask, progress
from .config import SCALING_CANDIDATES, SCALING_MODES, SCALING_ROWS, TRIAL_FACTORS, TRIAL_HOLDOUT, CALMConfig
from .layout import Layout
from .report import CALMReport, PhaseTimer
from .weights import check_model, default_forward, merged_parameter, trainable_tensors


class CALMMerger:
    """Runs CALM on one model whose tensors (by state-dict key) are the merged weights.

    layout: where this process's part of each tensor lives (Layout: all of it; under
    torch.distributed, calm_fast.distributed.fsdp.ShardedLayout: FSDP2 shards).
    """

    step_label = "masking"  # progress bars; a trial loop of init_scaling="trial" names its λ

    def __init__(self, pretrained, finetuned, keys, model, heads, data, forward, config: CALMConfig,
                 device, seed: int, progress_bar, progress_file: str | None = None, layout: Layout | None = None,
                 augment=None):
        config.validate()
        self.seed, self.progress_file = seed, progress_file
        self.pretrained, self.finetuned, self.keys = pretrained, finetuned, list(keys)
        self.tasks = list(finetuned)
        self.model, self.heads, self.config, self.device = model, heads, config, device
        self.layout = layout or Layout()
        self.forward = forward or default_forward(model)
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress_bar
        self.report = CALMReport(tasks=self.tasks)
        self.timer = PhaseTimer(self.report, device)
        check_model(model, pretrained, self.keys)
        self.tensors = trainable_tensors(model, heads, self.keys, device)
        self.pools = {t: sampling.collect_pool(data[t], t) for t in self.tasks}
        self.selected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # task -> (kept rows, pseudo-labels)
        self.training: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # what the masks train on
        self.checking: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # config.holdout: set aside

    @torch.no_grad()
    def load(self, state: Mapping) -> None:
        """Set the merged tensors to a whole state dict's values (this process's part of them)."""
        for key, t in self.tensors.items():
            self.layout.local(t).copy_(self.layout.part(key, state[key]))

    @torch.no_grad()
    def load_merged(self, initial, steps=(), scaling: float | None = None) -> None:
        """Set the model to θ0 + λ Σ_initial τ (λ: the run's chosen init_scaling unless given),
        then the finished sequential steps."""
        scaling = self.report.init_scaling if scaling is None else scaling
        for key, t in self.tensors.items():
            self.layout.local(t).copy_(merged_parameter(
                key, self.pretrained, self.finetuned, initial, scaling,
                [(task, None if key in no_grad else bits[key]) for task, bits, no_grad in steps], self.device,
                lambda full, key=key: self.layout.part(key, full)))

    def _bar(self, iterable, **kw):
        return self.progress(iterable, **kw) if self.progress else iterable

    # ---- stages 1 and 2 ----------------------------------------------------------------------
    def pseudo_label(self) -> None:
        with self.timer.phase("pseudo_labels"):
            for task in self.tasks:
                self.load(self.finetuned[task])
                keep, labels_ = labels.pseudo_labels(task, self.forward, self.heads[task], self.pools[task],
                                                     self.config, self.device, self.layout, self.progress)
                classes, counts = torch.unique(labels_, return_counts=True)
                self.selected[task] = (keep, labels_)
                self.report.pool_sizes[task] = sampling.pool_size(self.pools[task])
                self.report.pseudo_labels[task] = dict(zip(classes.tolist(), counts.tolist()))
        self.split_holdout()

    def split_holdout(self) -> None:
        """Set config.holdout of each task's pseudo-labels aside to check the masks on."""
        self.training, self.checking = self.split_rows(self.selected, self.config.holdout)

    def split_rows(self, rows: dict, fraction: float) -> tuple[dict, dict]:
        """(to train on, to check on): `fraction` of each task's (pool rows, pseudo-labels) set
        aside per class, drawn from the seed alone (the same split on every process and on resume)."""
        generator = torch.Generator().manual_seed(self.seed)
        training, checking = {}, {}
        for task in self.tasks:
            keep, labels_ = rows[task]
            train, check = labels.split_holdout(task, labels_, fraction, generator)
            training[task], checking[task] = (keep[train], labels_[train]), (keep[check], labels_[check])
        return training, checking

    def choose_order(self) -> None:
        rep = self.report
        labels.check_named(self.tasks, self.config)
        if self.config.order == "given":
            rep.initial, rep.sequential = labels.given_order(self.tasks, self.config)
            rep.order_reason = "given"
            return
        with self.timer.phase("order"):
            self.load_merged(self.tasks, scaling=self.config.order_scaling)
            for task in self.tasks:
                rep.agreement[task] = self.agreement(task, *self.selected[task])
            rep.initial, rep.sequential, rep.order_reason = labels.auto_order(self.tasks, rep.agreement, self.config)

    def choose_scaling(self) -> None:
        """The initial group's λ: the config's, or with init_scaling="auto" the candidate whose
        task arithmetic over the initial group agrees best with those tasks' pseudo-labels (up to
        SCALING_ROWS of each task's training rows, drawn from the seed; a tie keeps the smaller λ).
        The authors tuned their 0.3 for six initial tasks; it need not suit another group."""
        rep, cfg = self.report, self.config
        if cfg.init_scaling not in SCALING_MODES or not rep.initial:
            rep.init_scaling = cfg.order_scaling
            return
        generator = torch.Generator().manual_seed(self.seed)
        rows = {}
        for task in rep.initial:
            keep, labels_ = self.training[task]
            pick = torch.randperm(len(keep), generator=generator)[:SCALING_ROWS].sort().values
            rows[task] = (keep[pick], labels_[pick])
        with self.timer.phase("scaling"):
            for scaling in self._bar(SCALING_CANDIDATES, desc="choosing λ"):
                self.load_merged(rep.initial, scaling=scaling)
                score = sum(self.agreement(task, *rows[task]) for task in rep.initial) / len(rep.initial)
                rep.scaling_agreement.append([scaling, score])
        rep.init_scaling = max(rep.scaling_agreement, key=lambda pair: pair[1])[0]  # first of equals: smaller λ

    def try_scalings(self) -> None:
        """init_scaling="trial": auto's λ is best for task arithmetic, but the sequential masks also
        repair the initial group's conflicts, so a larger λ can end better. Each multiple
        TRIAL_FACTORS of auto's λ runs the whole sequential loop at config.trial_length updates per
        step, training on all but TRIAL_HOLDOUT of each task's pseudo-labels; the λ whose final model
        agrees best with the rest (mean over tasks) is kept, a tie keeping the smaller. The trials
        draw from their own generator: the run is then the run with the kept λ given as a number."""
        rep, cfg = self.report, self.config
        if cfg.init_scaling != "trial" or not rep.initial or not rep.sequential:
            return
        try:
            training, checking = self.split_rows(self.training, TRIAL_HOLDOUT)
        except ValueError as error:
            raise ValueError(f'{error} (init_scaling="trial" checks its trials on that fraction)') from None
        with self.timer.phase("scaling"):
            for scaling in sorted({round(rep.init_scaling * factor, 4) for factor in TRIAL_FACTORS}):
                trial = copy.copy(self)
                trial.config = replace(cfg, updates=cfg.trial_length, holdout=0.0)
                trial.report = CALMReport(self.tasks, rep.initial, rep.sequential, init_scaling=scaling)
                trial.timer = PhaseTimer(trial.report, self.device)
                trial.generator = torch.Generator().manual_seed(self.seed)
                trial.training, trial.checking, trial.progress_file = training, checking, None
                trial.step_label = f"trial λ {scaling}"
                trial.sequential_steps({}, {})
                rep.trial_agreement.append([scaling, trial.check(self.tasks)])
        rep.init_scaling = max(rep.trial_agreement, key=lambda pair: pair[1])[0]  # first of equals: smaller λ

    @torch.no_grad()
    def agreement(self, task: str, keep: torch.Tensor, labels_: torch.Tensor) -> float:
        """Fraction of the pool rows `keep` on which the model, as it is now, predicts `labels_`."""
        _, y = self.layout.score(self.forward, self.heads[task], sampling.take(self.pools[task], keep),
                                 self.config.score_batch_size, self.device)
        return float((y == labels_).float().mean())

    # ---- stage 3 -----------------------------------------------------------------------------
    def _accumulate_gradients(self, seen: list[str]) -> torch.Tensor:
        cfg = self.config
        for t in self.tensors.values():
            t.grad = None
        scale = 1.0 if cfg.accumulate == "sum" else 1.0 / (len(seen) * cfg.batches_per_task)
        total = torch.zeros((), device=self.device)  # stays on the device: no sync per batch
        for task in seen:
            for _ in range(cfg.batches_per_task):
                keep, labels_ = self.training[task]
                pick = torch.randperm(len(keep), generator=self.generator)[: cfg.batch_size]
                mine = self.layout.rows(torch.arange(len(pick)))  # this process's positions in the batch
                x, y = self._training_batch(task, keep[pick], mine), labels_[pick[mine]].to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                    loss = self.layout.loss(self.heads[task](self.forward(x)).float(), y, len(pick))
                (loss * scale).backward()
                total += loss.detach()
        self.layout.reduce_grads(self.tensors)
        return total

    def _training_batch(self, task: str, rows: torch.Tensor, mine: torch.Tensor):
        """Positions `mine` of the batch of pool rows `rows`. With `augment`, the whole batch is
        augmented on every process from the shared generator, so all draw alike and a process's
        rows are what one process would have augmented them to."""
        if self.augment is None:
            return sampling.take(self.pools[task], rows[mine], self.device)
        whole = self.augment(sampling.take(self.pools[task], rows, self.device), self.generator)
        return sampling.take(whole, mine)

    @torch.no_grad()
    def begin_step(self, task: str) -> tuple[dict, dict]:
        """(S, δ) of sequential task `task`: the top-k |τj| mask as ±b logits, and θ = base + σ(S)·δ."""
        cfg = self.config
        magnitudes, deltas = mask.step_inputs(task, self.pretrained, self.finetuned, self.tensors, cfg,
                                              self.device, self.layout)
        total = sum(spec(self.pretrained, key)[0].numel() for key in self.keys)
        logits = mask.initial_logits(magnitudes, int(cfg.sparsity * total), cfg.sigmoid_bias, self.layout)
        for key, t in self.tensors.items():
            ops.masked_apply_(self.layout.local(t), deltas[key], logits[key], "soft")
        return logits, deltas

    @torch.no_grad()
    def check(self, seen: list[str]) -> float:
        """The model's agreement, as it is now, with the pseudo-labels set aside (config.holdout),
        averaged over the seen tasks."""
        with self.timer.phase("check"):
            return sum(self.agreement(task, *self.checking[task]) for task in seen) / len(seen)

    def optimize_step(self, task: str, seen: list[str]) -> tuple[dict, dict]:
        """The step's (this process's, whole parameters') packed masks after `updates` updates or,
        with config.holdout, at the check that agreed best with the pseudo-labels set aside."""
        cfg, rep, layout = self.config, self.report, self.layout
        with self.timer.phase("mask_init"):
            logits, deltas = self.begin_step(task)
        best = mask.BestMasks(cfg.patience) if cfg.holdout else None
        if best is not None:
            best.offer(0, self.check(seen), logits)
        losses, sizes = [], rep.step_sizes.setdefault(task, [])
        for done in self._bar(range(1, cfg.updates + 1), desc=f"{self.step_label} {task}"):
            with self.timer.phase("forward_backward"):
                losses.append(self._accumulate_gradients(seen))
            with self.timer.phase("mask_step"):
                lr = mask.step_size(cfg, logits, self.tensors, deltas, layout)
                sizes.append(lr)
                mask.update(cfg, logits, self.tensors, deltas, lr, layout)
            if best is not None and (done % cfg.check_every == 0 or done == cfg.updates):
                if best.offer(done, self.check(seen), logits):
                    break
        if best is not None:
            best.restore(logits, cfg.sigmoid_bias)
            rep.checks[task], rep.best_update[task] = best.history, best.update
        rep.losses[task] = (layout.sum(torch.stack(losses)) / layout.world).tolist()
        with self.timer.phase("mask_finalize"):
            local, whole, on, rep.no_grad_keys[task] = mask.finished_masks(logits, self.tensors, layout)
            numel = {key: self.tensors[key].numel() for key in on}
            rep.mask_density_per_parameter[task] = {key: n / max(numel[key], 1) for key, n in on.items()}
            rep.mask_density[task] = sum(on.values()) / max(sum(numel.values()), 1)
            for t in self.tensors.values():
                t.grad = None
        return local, whole

    # ---- output and resume -------------------------------------------------------------------
    def masks(self, bits: dict[str, dict[str, torch.Tensor]]) -> maskfile.Masks:
        rep = self.report
        return maskfile.Masks(
            tasks=self.tasks, initial=list(rep.initial), sequential=list(bits),
            parameters={k: list(spec(self.pretrained, k)[0]) for k in self.keys},
            no_grad_keys={t: rep.no_grad_keys[t] for t in bits}, init_scaling=rep.init_scaling,
            config=maskfile.config_as_json(self.config), bits=bits)

    def fingerprint(self) -> dict:
        """What must match for a progress file to continue this run."""
        return {"tasks": self.tasks, "seed": self.seed, "config": maskfile.config_as_json(self.config),
                "parameters": {k: list(spec(self.pretrained, k)[0]) for k in self.keys},
                "pool_sizes": {t: sampling.pool_size(p) for t, p in self.pools.items()},
                "processes": self.layout.world}

    def _resume(self) -> tuple[dict, dict] | None:
        """(this process's, whole) masks of the finished steps, with the run's state restored."""
        saved = progress.load(self.progress_file, self.fingerprint(), self.tasks)
        if saved is None:
            return None
        self.report, self.timer.report = saved.report, saved.report
        self.generator.set_state(saved.generator_state)
        self.selected = saved.selected
        self.split_holdout()
        local = {task: {key: self.layout.local_mask(key, bits) for key, bits in step.items()}
                 for task, step in saved.bits.items()}
        return local, saved.bits

    def run(self):
        """Merged tensors (aliasing the model's), the packed masks per step, and the report.

        With a progress file, each finished step is saved to it, and a run that finds it
        (same tasks, config, seed, parameters, pool sizes and processes) continues after its last step.
        """
        resumed = self._resume()
        local, whole = resumed if resumed is not None else ({}, {})
        if resumed is None:
            self.pseudo_label()
            self.choose_order()
            self.choose_scaling()
            self.try_scalings()
        self.sequential_steps(local, whole)
        for t in self.tensors.values():
            if isinstance(t, torch.nn.Parameter):
                t.requires_grad_(False)
        return {k: t.detach() for k, t in self.tensors.items()}, self.masks(whole), self.report

    def sequential_steps(self, local: dict, whole: dict) -> None:
        """The initial merge, then each sequential step not in `local` (the finished steps'
        masks): its masks into `local` and `whole`, and with a progress file saved after it."""
        rep = self.report
        steps = [(task, local[task], set(rep.no_grad_keys[task])) for task in local]
        with self.timer.phase("initial_merge"):
            self.load_merged(rep.initial, steps)
        seen = list(rep.initial) + list(local)
        for task in rep.sequential[len(local):]:
            seen.append(task)
            local[task], whole[task] = self.optimize_step(task, seen)
            steps.append((task, local[task], set(rep.no_grad_keys[task])))
            with self.timer.phase("mask_finalize"):
                self.load_merged(rep.initial, steps)
            if self.progress_file is not None and self.layout.writes:
                progress.save(self.progress_file, self.masks(whole), self.fingerprint(), rep, self.generator,
                              self.selected)
