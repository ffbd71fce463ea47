"""The end-to-end benchmark's workload: an open_clip visual tower with random weights, synthetic
fine-tuned copies, frozen CLIP-style heads, synthetic image pools, and the pseudo-labels and
batch order that all three variants share."""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from calm_fast import CALMConfig, sampling
from calm_fast.calm.config import AUTHORS_SCALING

from ..harness import sync
from ..open_clip_compat import import_open_clip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_backbone(args) -> torch.nn.Module:
    """The open_clip visual tower of args.model, random weights (pretrained=None), fp32, CPU."""
    open_clip = import_open_clip()
    kwargs = {}
    if args.vision_width or args.vision_layers or args.patch_size:
        cfg = copy.deepcopy(open_clip.get_model_config(args.model))
        vision = cfg["vision_cfg"]
        for name, value in (("width", args.vision_width), ("layers", args.vision_layers),
                            ("patch_size", args.patch_size)):
            if value:
                vision[name] = value
        vision.pop("head_width", None) if args.vision_width else None
        vision["image_size"] = args.image_size
        kwargs["vision_cfg"] = vision
        kwargs["text_cfg"] = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(args.model, pretrained=None, force_image_size=args.image_size, **kwargs)
    visual = model.visual
    del model
    if args.grad_checkpointing:  # open_clip's own activation checkpointing (use_reentrant=False)
        visual.set_grad_checkpointing(True)
    return visual.float().eval()


# ---------------------------------------------------------------------------------------------
# synthetic workload


class SyntheticHead(torch.nn.Module):
    """Frozen CLIP-style head: logit_scale · <(f − μ)/‖f − μ‖, w_c> with random unit class vectors."""

    def __init__(self, dim: int, classes: int, gen: torch.Generator, logit_scale: float = 100.0):
        super().__init__()
        w = torch.randn(classes, dim, generator=gen)
        self.register_buffer("weight", w / w.norm(dim=1, keepdim=True))
        self.register_buffer("mu", torch.zeros(dim))
        self.logit_scale = logit_scale

    def forward(self, features):
        z = features.float() - self.mu
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.logit_scale * (z @ self.weight.t())


def synthetic_finetuned(theta0: dict, tasks: list[str], seed: int, noise: float, coord: float,
                        coord_fraction: float, device: torch.device) -> dict:
    """θt = θ0 + τt: dense noise (noise·rms) + rank-4 changes of ~coord_fraction of the matrices (coord·rms)."""
    out = {}
    for i, task in enumerate(tasks):
        gen = torch.Generator(device=device).manual_seed(seed * 1009 + 17 * (i + 1))
        pick = torch.Generator().manual_seed(seed * 7919 + i)
        state = {}
        for key, w in theta0.items():
            w_dev = w.to(device, torch.float32)
            ref = max(float(w_dev.square().mean().sqrt()), 0.02)
            tau = torch.randn(w.shape, generator=gen, device=device) * (noise * ref)
            if w.dim() == 2 and min(w.shape) >= 8 and float(torch.rand((), generator=pick)) < coord_fraction:
                rank = 4
                u = torch.randn(w.shape[0], rank, generator=gen, device=device)
                v = torch.randn(rank, w.shape[1], generator=gen, device=device)
                tau += (u @ v) * (coord * ref / math.sqrt(rank))
            state[key] = (w_dev + tau).to(w.dtype).cpu()
            del tau, w_dev
        out[task] = state
    return out


def synthetic_pools(tasks, pool_size: int, classes: int, image_size: int, seed: int) -> dict:
    """Per task: {"x": images [n, 3, s, s], "i": row index}; images = class prototype + noise."""
    pools = {}
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed * 31 + 1000 + i)
        protos = F.interpolate(torch.randn(classes, 3, 8, 8, generator=gen), size=image_size,
                               mode="bilinear", align_corners=False)
        cls = torch.arange(pool_size) % classes
        x = protos[cls] + 0.5 * torch.randn(pool_size, 3, image_size, image_size, generator=gen)
        pools[task] = {"x": x.contiguous(), "i": torch.arange(pool_size)}
    return pools


@dataclass
class Problem:
    keys: list[str]
    theta0: dict
    finetuned: dict
    heads: dict
    initial: list[str]
    sequential: list[str]
    config: CALMConfig
    device: torch.device
    template: torch.nn.Module
    pools: dict = field(default_factory=dict)
    selected: dict = field(default_factory=dict)  # task -> (kept row indices, pseudo-labels)
    num_params: int = 0

    def make_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.template)


class Sampler:
    """calm_fast's batch sampler (CALMMerger._sample), replayed: same generator, seed and order."""

    def __init__(self, problem: Problem, seed: int):
        self.p, self.gen, self.log = problem, torch.Generator().manual_seed(seed), []

    def next(self, task):
        keep, labels = self.p.selected[task]
        pick = torch.randperm(len(keep), generator=self.gen)[: self.p.config.batch_size]
        rows = keep[pick]
        self.log.append((task, rows))
        return self.p.pools[task]["x"][rows].to(self.p.device), labels[pick].to(self.p.device)


def expected_batches(problem: Problem, seed: int) -> list[torch.Tensor]:
    """The row indices of every mini-batch calm_fast draws, in order (no data moved)."""
    gen, rows, seen = torch.Generator().manual_seed(seed), [], list(problem.initial)
    for task in problem.sequential:
        seen.append(task)
        for _ in range(problem.config.updates):
            for t in seen:
                for _ in range(problem.config.batches_per_task):
                    keep = problem.selected[t][0]
                    rows.append(keep[torch.randperm(len(keep), generator=gen)[: problem.config.batch_size]])
    return rows


@torch.no_grad()
def pseudo_label(problem: Problem, log) -> float:
    """CB-EMS with calm_fast's own code, each task scored by its fine-tuned model (as merge() does)."""
    dev, cfg = problem.device, problem.config
    model = problem.make_model().to(dev)
    own = model.state_dict(keep_vars=True)
    start = time.perf_counter()
    for task in problem.finetuned:
        for key in problem.keys:
            own[key].data.copy_(problem.finetuned[task][key])
        h, y = sampling.score(lambda b: model(b["x"]), problem.heads[task], problem.pools[task],
                              cfg.score_batch_size, dev)
        keep = sampling.select_low_entropy(h, y, cfg.ratio, cfg.balanced)
        labels = y[keep]
        classes = torch.unique(labels)
        if len(classes) < 2:
            raise RuntimeError(f"e2e: task {task}: every pseudo-label is class {int(classes[0])}; "
                               f"use more --classes or --pool-size")
        problem.selected[task] = (keep, labels)
    sync(dev)
    seconds = time.perf_counter() - start
    log(f"pseudo-labels: {seconds:.2f} s; kept per task "
        f"{ {t: len(k) for t, (k, _) in problem.selected.items()} }")
    return seconds


@torch.no_grad()
def calibrate_heads(problem: Problem) -> None:
    """μ of each head = mean θ0 feature of (up to) 64 of the task's images."""
    dev = problem.device
    model = problem.make_model().to(dev)
    for task, head in problem.heads.items():
        x = problem.pools[task]["x"][:64].to(dev)
        head.mu.copy_(model(x).float().mean(0))



def build_problem(args, device: torch.device, log) -> Problem:
    """The tower, T fine-tuned copies, heads (calibrated on θ0) and pools that args describe."""
    t_setup = time.perf_counter()
    template = build_backbone(args)
    theta0 = {k: v.detach().clone() for k, v in template.state_dict().items()}
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    num_params = sum(theta0[k].numel() for k in keys)
    tasks = [f"task{i}" for i in range(args.tasks)]
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    finetuned = synthetic_finetuned(theta0, tasks, args.seed, args.noise, args.coord, args.coord_fraction, gen_device)
    pools = synthetic_pools(tasks, args.pool_size, args.classes, args.image_size, args.seed)
    head_gen = torch.Generator().manual_seed(args.seed + 99)
    out_dim = getattr(template, "output_dim", None) or template(pools[tasks[0]]["x"][:1]).shape[-1]
    heads = {t: SyntheticHead(out_dim, args.classes, head_gen, args.logit_scale).to(device).eval().requires_grad_(False)
             for t in tasks}
    config = CALMConfig(initial=tuple(tasks[: args.initial]), sequential=tuple(tasks[args.initial:]),
                        updates=args.updates, batches_per_task=args.batches_per_task, batch_size=args.batch_size,
                        step="authors", init_scaling=AUTHORS_SCALING, sparsity=args.sparsity,
                        delta_dtype=DTYPES[args.delta_dtype], autocast=args.autocast,
                        score_batch_size=args.score_batch_size)
    problem = Problem(keys=keys, theta0=theta0, finetuned=finetuned, heads=heads, initial=list(config.initial),
                      sequential=list(config.sequential), config=config, device=device, template=template,
                      pools=pools, num_params=num_params)
    calibrate_heads(problem)
    log(f"e2e {args.config}: {args.model} visual tower, {num_params:,} params, {len(keys)} tensors, device {device}; "
        f"setup {time.perf_counter() - t_setup:.1f} s")
    return problem
