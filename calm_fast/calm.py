"""CALM: pseudo-labels by CB-EMS, the sequential framework, consensus-aware mask optimization.

State kept on the device for the step in flight, beyond the model and its gradients: the mask
logits S (fp32) and δ = τj − τ_merged (fp32 or bf16), one tensor of each per merged parameter.
The model's own tensors hold θ = base + σ(S)·δ throughout; base = θ0 + τ_merged is never
stored, because mask_step_ recovers it as θ − σ(S_old)·δ inside the fused sweep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import maskfile, ops, sampling
from .checkpoint import spec

STEP_RULES = ("normalized", "authors")
ACCUMULATIONS = ("sum", "mean")
ORDERS = ("given", "auto")


@dataclass(frozen=True)
class CALMConfig:
    """Hyper-parameters; defaults are the authors' values except the scale-free step."""

    initial: tuple[str, ...] | None = None  # tasks merged by task arithmetic (G0)
    sequential: tuple[str, ...] | None = None  # tasks added one by one with a learned mask
    order: str = "given"  # "auto": choose the sequential tasks from pseudo-label agreement
    num_sequential: int = 2  # how many sequential tasks when they are not named
    init_scaling: float = 0.3  # λ of the task arithmetic over G0
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

    @property
    def step_size(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 if self.step == "normalized" else 1e7

    def validate(self) -> None:
        def bad(field_name, value, allowed):
            raise ValueError(f"calm_fast: CALMConfig.{field_name} must be {allowed}, got {value!r}")

        if self.order not in ORDERS:
            bad("order", self.order, f"one of {ORDERS}")
        if self.step not in STEP_RULES:
            bad("step", self.step, f"one of {STEP_RULES}")
        if self.accumulate not in ACCUMULATIONS:
            bad("accumulate", self.accumulate, f"one of {ACCUMULATIONS}")
        if self.reg not in ("polarize", "l1", "none"):
            bad("reg", self.reg, "one of ('polarize', 'l1', 'none')")
        if not 0.0 < self.ratio <= 1.0:
            bad("ratio", self.ratio, "in (0, 1]")
        if not 0.0 <= self.sparsity <= 1.0:
            bad("sparsity", self.sparsity, "in [0, 1]")
        if self.delta_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            bad("delta_dtype", self.delta_dtype, "float32, bfloat16 or float16")
        for name in ("updates", "batches_per_task", "batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), ">= 1")
        if self.step_size <= 0:
            bad("lr", self.lr, "> 0")


@dataclass
class CALMReport:
    tasks: list[str]
    initial: list[str] = field(default_factory=list)
    sequential: list[str] = field(default_factory=list)
    order_reason: str = ""
    agreement: dict[str, float] = field(default_factory=dict)  # order="auto": TA model vs pseudo-labels
    pseudo_labels: dict[str, dict[int, int]] = field(default_factory=dict)  # task -> class -> kept
    pool_sizes: dict[str, int] = field(default_factory=dict)
    mask_density: dict[str, float] = field(default_factory=dict)  # step task -> kept fraction
    mask_density_per_parameter: dict[str, dict[str, float]] = field(default_factory=dict)
    no_grad_keys: dict[str, list[str]] = field(default_factory=dict)  # averaged 0.5 / 0.5
    losses: dict[str, list[float]] = field(default_factory=dict)  # step task -> loss per update
    step_sizes: dict[str, list[float]] = field(default_factory=dict)  # effective lr per update
    seconds: dict[str, float] = field(default_factory=dict)


def default_forward(model: torch.nn.Module) -> Callable:
    def forward(batch):
        return model(**batch) if isinstance(batch, Mapping) else model(batch)

    return forward


@torch.no_grad()
def merged_parameter(key, pretrained, finetuned, initial, scaling: float, steps, device) -> torch.Tensor:
    """One parameter of a CALM merge, rebuilt from θ0, the task weights and the finished steps.

    steps: (task, packed mask bits, or None where the parameter got no gradient) in order. CALM
    itself rebuilds its base this way after each step, so replaying saved masks reproduces its
    merged weights bit for bit.
    """
    theta0 = pretrained[key].to(device, torch.float32)
    taus = [(finetuned[t][key].to(device, torch.float32) - theta0).contiguous() for t in initial]
    current = theta0 + ops.consensus_merge(taus, [scaling] * len(taus)) if taus else theta0.clone()
    for task, bits in steps:
        delta = (finetuned[task][key].to(device, torch.float32) - current).contiguous()
        if bits is None:  # no gradient reached it: the average of τ_merged and τj
            current = current + 0.5 * delta
        else:
            ops.masked_apply_(current, delta, bits, "packed")
    return current


def check_model(model: torch.nn.Module, pretrained, keys) -> None:
    """The architecture CALM runs holds every merged key, with pretrained's shape."""
    own = model.state_dict()
    missing = [k for k in keys if k not in own]
    if missing:
        raise KeyError(f"calm_fast: the model lacks {len(missing)} merged key(s): {missing[:5]}")
    for key in keys:
        shape = spec(pretrained, key)[0]
        if own[key].shape != shape:
            raise ValueError(f"calm_fast: model's {key} has shape {tuple(own[key].shape)}, "
                             f"pretrained has {tuple(shape)}")


class _Timer:
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


class CALMMerger:
    """Runs CALM on one model whose tensors (by state-dict key) are the merged weights."""

    def __init__(self, pretrained, finetuned, keys, model, heads, data, forward, config: CALMConfig,
                 device, seed: int, progress, progress_file: str | None = None):
        config.validate()
        self.seed, self.progress_file = seed, progress_file
        self.pretrained, self.finetuned, self.keys = pretrained, finetuned, list(keys)
        self.tasks = list(finetuned)
        self.model, self.heads, self.config, self.device = model, heads, config, device
        self.forward = forward or default_forward(model)
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        self.report = CALMReport(tasks=self.tasks)
        self.timer = _Timer(self.report, device)
        self.tensors = self._merged_tensors()
        self.pools = {t: sampling.collect_pool(data[t], t) for t in self.tasks}
        self.selected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- setup -------------------------------------------------------------------------------
    def _merged_tensors(self) -> dict[str, torch.Tensor]:
        check_model(self.model, self.pretrained, self.keys)
        own = self.model.state_dict(keep_vars=True)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for head in self.heads.values():
            if isinstance(head, torch.nn.Module):
                head.to(self.device).eval().requires_grad_(False)
        tensors = {k: own[k] for k in self.keys}
        for t in tensors.values():
            if isinstance(t, torch.nn.Parameter):
                t.requires_grad_(True)
        self.model.eval()
        return tensors

    @torch.no_grad()
    def _load(self, state) -> None:
        for key, t in self.tensors.items():
            t.copy_(state[key])

    @torch.no_grad()
    def _load_merged(self, initial, steps=()) -> None:
        """Set the model to θ0 + λ Σ_initial τ, then the finished sequential steps."""
        for key, t in self.tensors.items():
            t.copy_(merged_parameter(key, self.pretrained, self.finetuned, initial, self.config.init_scaling,
                                     [(task, None if key in no_grad else bits[key])
                                      for task, bits, no_grad in steps], self.device))

    def _bar(self, iterable, **kw):
        return self.progress(iterable, **kw) if self.progress else iterable

    # ---- 1. CB-EMS ---------------------------------------------------------------------------
    def pseudo_label(self) -> None:
        cfg = self.config
        with self.timer.phase("pseudo_labels"):
            for task in self.tasks:
                self._load(self.finetuned[task])
                h, y = sampling.score(self.forward, self.heads[task], self.pools[task], cfg.score_batch_size,
                                      self.device, self.progress, desc=f"scoring {task}")
                keep = sampling.select_low_entropy(h, y, cfg.ratio, cfg.balanced)
                labels = y[keep]
                classes, counts = torch.unique(labels, return_counts=True)
                if len(keep) == 0:
                    raise ValueError(f"calm_fast: task {task!r}: no pseudo-labelled example survives "
                                     f"ratio={cfg.ratio} over {len(y)} examples; give it more data")
                if len(classes) < 2:
                    raise ValueError(f"calm_fast: task {task!r}: every pseudo-label is class "
                                     f"{int(classes[0])}; its fine-tuned model or head looks collapsed")
                self.selected[task] = (keep, labels)
                self.report.pool_sizes[task] = len(y)
                self.report.pseudo_labels[task] = dict(zip(classes.tolist(), counts.tolist()))

    # ---- 2. framework ------------------------------------------------------------------------
    def choose_order(self) -> None:
        cfg, rep = self.config, self.report
        named = [t for group in (cfg.initial, cfg.sequential) if group for t in group]
        unknown = sorted(set(named) - set(self.tasks))
        if unknown:
            raise ValueError(f"calm_fast: order names unknown task(s) {unknown}; tasks are {self.tasks}")
        if cfg.order == "auto":
            with self.timer.phase("order"):
                self._auto_order()
            return
        if cfg.sequential is not None:
            sequential = list(cfg.sequential)
        else:
            rest = [t for t in self.tasks if cfg.initial is None or t not in cfg.initial]
            sequential = rest[len(rest) - min(cfg.num_sequential, len(self.tasks) - 1):]
        initial = list(cfg.initial) if cfg.initial is not None else [t for t in self.tasks if t not in sequential]
        overlap = sorted(set(initial) & set(sequential))
        if overlap or len(set(initial) | set(sequential)) != len(self.tasks):
            raise ValueError(f"calm_fast: initial {initial} and sequential {sequential} must split the "
                             f"tasks {self.tasks} without overlap")
        rep.initial, rep.sequential = initial, sequential
        rep.order_reason = "given"

    @torch.no_grad()
    def _auto_order(self) -> None:
        """Sequential = the tasks whose own pseudo-labels the task-arithmetic model keeps least."""
        cfg, rep = self.config, self.report
        self._load_merged(self.tasks)
        for task in self.tasks:
            keep, labels = self.selected[task]
            pool = sampling.take(self.pools[task], keep)
            _, y = sampling.score(self.forward, self.heads[task], pool, cfg.score_batch_size, self.device)
            rep.agreement[task] = float((y == labels).float().mean())
        ranked = sorted(self.tasks, key=lambda t: rep.agreement[t])
        count = min(cfg.num_sequential, len(self.tasks) - 1)
        rep.sequential = ranked[:count]
        rep.initial = [t for t in self.tasks if t not in rep.sequential]
        rep.order_reason = (f"auto: the {count} task(s) whose pseudo-labels the task-arithmetic model "
                            f"(λ={cfg.init_scaling}) agrees with least go sequential, least first")

    # ---- 3. mask optimization ----------------------------------------------------------------
    @torch.no_grad()
    def _init_step(self, task: str):
        """δ = θj − base and the initial logits: +b on the top-k |τj| over the model, −b elsewhere."""
        cfg = self.config
        logits, deltas = {}, {}
        for key, t in self.tensors.items():  # |τj| is staged in the logits buffer itself
            theta_j = self.finetuned[task][key].to(self.device, torch.float32)
            logits[key] = (theta_j - self.pretrained[key].to(self.device, torch.float32)).abs_().contiguous()
            deltas[key] = (theta_j - t).to(cfg.delta_dtype).contiguous()
        total = sum(s.numel() for s in logits.values())
        k = int(cfg.sparsity * total)
        threshold, quota = ops.magnitude_threshold(list(logits.values()), k)
        threshold = float(threshold)
        for (key, s), q in zip(logits.items(), quota.tolist()):
            chosen = s > threshold
            if q:
                ties = torch.nonzero(s.reshape(-1) == threshold).flatten()[:q]
                chosen.view(-1)[ties] = True
            s.copy_(torch.where(chosen, cfg.sigmoid_bias, -cfg.sigmoid_bias))
        for key, t in self.tensors.items():
            ops.masked_apply_(t.data, deltas[key], logits[key], "soft")
        return logits, deltas

    def _sample(self, task: str):
        keep, labels = self.selected[task]
        pick = torch.randperm(len(keep), generator=self.generator)[: self.config.batch_size]
        return sampling.take(self.pools[task], keep[pick], self.device), labels[pick].to(self.device)

    def _accumulate_gradients(self, seen: list[str]) -> torch.Tensor:
        cfg = self.config
        for t in self.tensors.values():
            t.grad = None
        scale = 1.0 if cfg.accumulate == "sum" else 1.0 / (len(seen) * cfg.batches_per_task)
        total = torch.zeros((), device=self.device)  # stays on the device: no sync per batch
        for task in seen:
            for _ in range(cfg.batches_per_task):
                x, y = self._sample(task)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                    loss = F.cross_entropy(self.heads[task](self.forward(x)).float(), y)
                (loss * scale).backward()
                total += loss.detach()
        return total

    @torch.no_grad()
    def _step_size(self, logits, deltas) -> float:
        cfg = self.config
        if cfg.step == "authors":
            return cfg.step_size
        sums, count = [], 0
        for key, t in self.tensors.items():
            if t.grad is not None:
                sums.append(ops.mask_grad_sumsq(logits[key], t.grad, deltas[key]))
                count += t.numel()
        if not sums:
            return 0.0
        rms = (torch.stack(sums).sum() / count).sqrt().item()  # the update's one host sync
        return cfg.step_size / rms if rms > 0 else 0.0

    def optimize_step(self, task: str, seen: list[str]) -> dict[str, torch.Tensor]:
        cfg, rep = self.config, self.report
        with self.timer.phase("mask_init"):
            logits, deltas = self._init_step(task)
        losses, sizes = [], rep.step_sizes.setdefault(task, [])
        for _ in self._bar(range(cfg.updates), desc=f"masking {task}"):
            with self.timer.phase("forward_backward"):
                losses.append(self._accumulate_gradients(seen))
            with self.timer.phase("mask_step"):
                lr = self._step_size(logits, deltas)
                sizes.append(lr)
                for key, t in self.tensors.items():
                    if t.grad is not None:
                        ops.mask_step_(logits[key], t.data, t.grad, deltas[key], lr=lr, l1=cfg.l1, reg=cfg.reg)
        rep.losses[task] = torch.stack(losses).tolist()
        with self.timer.phase("mask_finalize"):
            return self._finalize_step(task, logits)

    @torch.no_grad()
    def _finalize_step(self, task, logits) -> dict[str, torch.Tensor]:
        """The step's binary mask m = [S > 0], packed, for each parameter a gradient reached; the
        others are recorded (they take the average of τ_merged and τj when the base is rebuilt)."""
        rep = self.report
        masks, kept, total = {}, 0, 0
        per_param = rep.mask_density_per_parameter.setdefault(task, {})
        rep.no_grad_keys[task] = [key for key, t in self.tensors.items() if t.grad is None]
        for key, t in self.tensors.items():
            if t.grad is None:
                continue
            masks[key] = ops.pack_mask(logits[key])
            on = int((logits[key] > 0).sum())
            per_param[key] = on / max(t.numel(), 1)
            kept, total = kept + on, total + t.numel()
            t.grad = None
        rep.mask_density[task] = kept / max(total, 1)
        return masks

    # ---- progress file (resume) --------------------------------------------------------------
    def _parameter_shapes(self) -> dict[str, list[int]]:
        return {k: list(spec(self.pretrained, k)[0]) for k in self.keys}

    def masks(self, bits: dict[str, dict[str, torch.Tensor]]) -> maskfile.Masks:
        rep = self.report
        return maskfile.Masks(
            tasks=self.tasks, initial=list(rep.initial), sequential=list(bits),
            parameters=self._parameter_shapes(),
            no_grad_keys={t: rep.no_grad_keys[t] for t in bits}, init_scaling=self.config.init_scaling,
            config=maskfile.config_as_json(self.config), bits=bits)

    def _fingerprint(self) -> dict:
        """What must match for a progress file to continue this run."""
        return {"tasks": self.tasks, "seed": self.seed, "config": maskfile.config_as_json(self.config),
                "parameters": self._parameter_shapes(),
                "pool_sizes": {t: sampling.pool_size(p) for t, p in self.pools.items()}}

    def _save_progress(self, bits) -> None:
        resume = {"fingerprint": self._fingerprint(), "planned": self.report.sequential,
                  "report": dataclasses.asdict(self.report)}
        tensors = {"generator": self.generator.get_state()}
        for i, task in enumerate(self.tasks):
            keep, labels = self.selected[task]
            tensors[f"keep.{i}"], tensors[f"labels.{i}"] = keep, labels
        maskfile.write(self.progress_file, self.masks(bits), resume, tensors)

    def _resume(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """The finished steps' masks from the progress file, with the run's state restored."""
        if self.progress_file is None or not os.path.exists(self.progress_file):
            return None
        saved, resume, tensors = maskfile.read(self.progress_file)
        if resume is None:
            raise ValueError(f"calm_fast: {self.progress_file} is a mask file without resume state")
        now = self._fingerprint()
        differs = [name for name in now if resume["fingerprint"].get(name) != now[name]]
        if differs:
            raise ValueError(f"calm_fast: {self.progress_file} belongs to another run ({', '.join(differs)} "
                             "differ); delete it or give another progress file")
        report = resume["report"]
        report["pseudo_labels"] = {t: {int(c): n for c, n in counts.items()}
                                   for t, counts in report["pseudo_labels"].items()}
        self.report = CALMReport(**report)
        self.report.sequential = resume["planned"]
        self.timer.report = self.report
        self.generator.set_state(tensors["generator"])
        self.selected = {t: (tensors[f"keep.{i}"], tensors[f"labels.{i}"]) for i, t in enumerate(self.tasks)}
        return saved.bits

    # ---- driver ------------------------------------------------------------------------------
    def run(self):
        """Merged tensors (aliasing the model's), the packed masks per step, and the report.

        With a progress file, each finished step is saved to it, and a run that finds it
        (same tasks, config, seed, parameters and pool sizes) continues after its last step.
        """
        bits = self._resume()
        if bits is None:
            bits = {}
            self.pseudo_label()
            self.choose_order()
        rep = self.report
        steps = [(task, bits[task], set(rep.no_grad_keys[task])) for task in bits]
        with self.timer.phase("initial_merge"):
            self._load_merged(rep.initial, steps)
        seen = list(rep.initial) + list(bits)
        for task in rep.sequential[len(bits):]:
            seen.append(task)
            bits[task] = self.optimize_step(task, seen)
            steps.append((task, bits[task], set(rep.no_grad_keys[task])))
            with self.timer.phase("mask_finalize"):
                self._load_merged(rep.initial, steps)
            if self.progress_file is not None:
                self._save_progress(bits)
        for t in self.tensors.values():
            if isinstance(t, torch.nn.Parameter):
                t.requires_grad_(False)
        return {k: t.detach() for k, t in self.tensors.items()}, self.masks(bits), rep
