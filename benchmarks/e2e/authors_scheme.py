"""Variant (a) of the end-to-end benchmark: the CALM authors' data-movement scheme.

A transcription of github.com/yankd22/CALM, src/mask_merging.py (class MaskMerging: methods
create_basepatch, interpolate_model, train, get_params) and the driver loop of src/main.py,
kept faithful in everything that moves or allocates memory, so that its cost is what the
authors' scripts pay:

- θ0, τ_merged ("task_vector1") and τ_new ("task_vector2") are fp32 CPU tensors created with
  `.detach().requires_grad_().cpu()` (so the per-batch products below build autograd nodes,
  as in the scripts); the mask logits S ("basepatch") and the accumulated gradient G
  ("total_grad") live on the CPU too.
- Every update rebuilds θ = θ0 + (1 − σ(S))·τ1 + σ(S)·τ2 on the CPU, uploads it, and installs it
  as fresh nn.Parameters (make_functional / load_weights_grad), counting σ(S) with torch.sum.
- After every mini-batch: clone every gradient, zero_grad, upload τ1 and τ2 again,
  g' = −g·τ1 + g·τ2 on the GPU, download lr·g' and add it to G on the CPU.
- G is divided by a counter that never grows past 1 (so G is a sum), then the CPU mask update
  S ← S − (G·σ'(S) − λ1·where(S > 0, σ'(S), −σ'(S))), σ'(S) evaluated with two sigmoids.
- Initial mask: global top-k of |τ2| over a torch.cat of the whole model, then strict `>`
  against the k-th value (so k − 1 entries start at +b when there are no ties) and `<=` for −b.
- After the last update: τ_merged ← (1 − round σ(S))·τ1 + round σ(S)·τ2 (get_params), on the CPU.

Deliberate differences from the scripts, none of which touches data movement:
- Inputs: the same pseudo-labelled mini-batches as calm_fast (a sampler given by the runner)
  instead of the scripts' shuffled DataLoader over their CB-EMS sample files; `break` after
  `batches_per_task` batches (the scripts: `if idx > 0: break`, i.e. 2).
- The model is the open_clip visual tower alone; the scripts' list of frozen text-tower names
  is empty here (every visual parameter is trainable), and heads are the runner's frozen heads.
- No logging, evaluation or mask files; parameters are paired by name (the scripts pair them by
  position, which is the same order here).
"""
from __future__ import annotations

import time

import torch

from ..harness import sync


# make_functional / load_weights of src/main.py and set_attr of MaskMerging
def _del_attr(obj, names):
    if len(names) == 1:
        delattr(obj, names[0])
    else:
        _del_attr(getattr(obj, names[0]), names[1:])


def _set_attr(obj, names, val):
    if len(names) == 1:
        setattr(obj, names[0], val)
    else:
        _set_attr(getattr(obj, names[0]), names[1:], val)


def make_functional(mod: torch.nn.Module):
    orig_params = tuple(mod.parameters())
    names = []
    for name, _ in list(mod.named_parameters()):
        _del_attr(mod, name.split("."))
        names.append(name)
    return orig_params, names


class AuthorsMaskMerging:
    """MaskMerging for one sequential step (one new task), as in the authors' scripts."""

    def __init__(self, paramslist, model, names, heads, seen, cfg, device, sampler):
        self.paramslist = paramslist  # [θ0, τ_merged, τ_new], tuples of CPU tensors in `names` order
        self.model, self.names, self.heads, self.seen = model, names, heads, seen
        self.cfg, self.device, self.sampler = cfg, device, sampler
        self.frozen: list[str] = []  # the scripts' frozen names are text-tower ones: none here
        self.trainable_paramslist = [[p for p, n in zip(params, names) if n not in self.frozen]
                                     for params in paramslist]
        self.trainable_name = [n for n in names if n not in self.frozen]
        self.num_params = sum(p.numel() for p in self.trainable_paramslist[-1])
        self.mask = self.create_basepatch()
        self.timings: list[dict] = []

    def create_basepatch(self):
        abs_tv = torch.cat([torch.abs(p).view(-1) for p in self.trainable_paramslist[-1]])
        k = int(self.cfg.sparsity * abs_tv.numel())
        values, _ = torch.topk(abs_tv, k)
        threshold = values.min()
        basepatch = [torch.zeros_like(p, requires_grad=False) for p in self.trainable_paramslist[-1]]
        for p, q in zip(self.trainable_paramslist[-1], basepatch):
            q[torch.abs(p) > threshold] = self.cfg.sigmoid_bias
            q[torch.abs(p) <= threshold] = -self.cfg.sigmoid_bias
        self.selected_at_init = int(sum(torch.sum(torch.round(torch.sigmoid(p))) for p in basepatch))
        return basepatch

    def load_weights_grad(self, names, params):
        for name, p in zip(names, params):
            _set_attr(self.model, name.split("."), torch.nn.Parameter(p, requires_grad=True))

    def interpolate_model(self):
        sigmoid = torch.nn.Sigmoid()
        paramlist_curr, mask_idx = [], 0
        n_graft_params, n_total_params = 0, 0
        for idx, name in enumerate(self.names):
            pretrained_params = self.paramslist[0][idx]
            task_vector1 = self.paramslist[1][idx]
            task_vector2 = self.paramslist[-1][idx]
            with torch.no_grad():
                if name in self.frozen:
                    paramlist_curr.append(pretrained_params + 0.5 * (task_vector1 + task_vector2))
                else:
                    frac = sigmoid(self.mask[mask_idx])
                    mask_idx += 1
                    interpolated = pretrained_params + (1 - frac) * task_vector1 + frac * task_vector2
                    n_graft_params += torch.sum(frac)
                    n_total_params += pretrained_params.numel()
                    paramlist_curr.append(interpolated.to(self.device))
        self.load_weights_grad(self.names, paramlist_curr)

    def train(self):
        """One update ("epoch" in main.py): MaskMerging.train, with timings around fwd/bwd."""
        criterion = torch.nn.CrossEntropyLoss()
        sigmoid = torch.nn.Sigmoid()
        lr, cfg, dev = self.cfg.step_size, self.cfg, self.device
        sync(dev)
        start = time.perf_counter()
        fwd_bwd = 0.0
        total_grad, first_batch = [], 0
        self.interpolate_model()
        for dataset_name in self.seen:
            classification_head = self.heads[dataset_name]
            classification_head.to(dev)
            for idx in range(cfg.batches_per_task):  # the scripts: enumerate(loader) ... if idx > 0: break
                x, y = self.sampler.next(dataset_name)
                sync(dev)
                t0 = time.perf_counter()
                features = self.model(x)
                outputs = classification_head(features)
                loss = criterion(outputs, y)
                loss.backward()
                sync(dev)
                fwd_bwd += time.perf_counter() - t0
                for n, p in self.model.named_parameters():
                    if n in self.trainable_name:
                        if p.grad is None:
                            print(n)
                grad = [p.grad.detach().clone() for n, p in self.model.named_parameters()
                        if n in self.trainable_name]
                self.model.zero_grad()
                grad = [-g * task1.to(dev) + g * task2.to(dev)
                        for (g, task1, task2) in zip(grad, self.trainable_paramslist[1],
                                                     self.trainable_paramslist[-1])]
                if first_batch == 0:
                    total_grad = [lr * g.detach().cpu() for g in grad]
                    first_batch += 1
                else:
                    total_grad = [p + lr * g.detach().cpu() for (p, g) in zip(total_grad, grad)]
                # as in the scripts, `grad` (with the autograd nodes that keep g alive) lives on
                # through the next mini-batch's forward/backward, until it is reassigned
        total_grad = [p / (1.0 * first_batch) for p in total_grad]
        with torch.no_grad():
            for p, g in zip(self.mask, total_grad):
                derivative = sigmoid(p) * (1 - sigmoid(p))
                reg_term = cfg.l1 * torch.where(p > 0, derivative, -derivative)
                p -= g * derivative - reg_term
        sync(dev)
        total = time.perf_counter() - start
        self.timings.append({"fwd_bwd_s": fwd_bwd, "elementwise_s": total - fwd_bwd, "total_s": total})

    def get_params(self):
        """τ_merged for the next step: (1 − round σ(S))·τ1 + round σ(S)·τ2, on the CPU."""
        paramlist_curr, mask_idx, binary = [], 0, {}
        for idx, name in enumerate(self.names):
            task_vector1 = self.paramslist[1][idx]
            task_vector2 = self.paramslist[-1][idx]
            with torch.no_grad():
                if name in self.frozen:
                    paramlist_curr.append(0.5 * (task_vector1 + task_vector2))
                else:
                    frac = torch.round(torch.sigmoid(self.mask[mask_idx]))
                    binary[name] = frac > 0
                    mask_idx += 1
                    interpolated = (1 - frac) * task_vector1 + frac * task_vector2
                    paramlist_curr.append(interpolated.detach().requires_grad_().cpu())
        return tuple(paramlist_curr), binary


def task_vector(problem, names, task):
    """TaskVector(pretrained, finetuned).vector of the scripts, in `names` order, on the CPU."""
    with torch.no_grad():
        return tuple((problem.finetuned[task][n] - problem.theta0[n]).detach().requires_grad_().cpu()
                     for n in names)


def initial_merge(problem, names):
    """Step 0 of main.py: task arithmetic over the initial group, prior 0.3, on the CPU."""
    initial_tvs = [task_vector(problem, names, task) for task in problem.initial]
    rlambdas = torch.ones(1, len(initial_tvs)) * problem.config.init_scaling
    with torch.no_grad():
        return tuple(sum(tuple(pi * lambdasi for pi, lambdasi in zip(p, rlambdas[0])))
                     for p in zip(*initial_tvs))


def run(problem, sampler) -> dict:
    """The authors' sequential framework over problem.initial / problem.sequential.

    problem: the runner's Problem (keys, theta0 / finetuned CPU state dicts, heads on the
    device, a fresh-module factory, the CALMConfig, the device). sampler.next(task) -> (x, y)
    on the device, in calm_fast's batch order. Returns phases (s), per-update timings and the
    binary masks (task -> name -> bool CPU tensor).
    """
    cfg, dev = problem.config, problem.device
    phases: dict[str, float] = {}
    t = time.perf_counter()
    model = problem.make_model().to(dev)
    _, names = make_functional(model)
    missing = sorted(set(names) - set(problem.keys))
    if missing:
        raise KeyError(f"authors scheme: parameters without merge key: {missing[:5]}")
    pretrained = tuple(problem.theta0[n].detach().requires_grad_().cpu() for n in names)
    best_param = [initial_merge(problem, names)]
    sync(dev)
    phases["setup_and_initial_merge_s"] = time.perf_counter() - t

    masks, updates, selected_at_init = {}, [], {}
    seen = list(problem.initial)
    phases["mask_init_s"] = phases["updates_s"] = phases["mask_finalize_s"] = 0.0
    for step, task in enumerate(problem.sequential):
        seen.append(task)
        t = time.perf_counter()
        paramslist = [pretrained, best_param[-1], task_vector(problem, names, task)]
        mm = AuthorsMaskMerging(paramslist, model, names, problem.heads, list(seen), cfg, dev, sampler)
        selected_at_init[task] = mm.selected_at_init
        sync(dev)
        phases["mask_init_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for update in range(cfg.updates):
            mm.train()
            updates.append({"step": step, "task": task, "update": update, "seen": len(seen),
                            "batches": len(seen) * cfg.batches_per_task, **mm.timings[-1]})
        phases["updates_s"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            param, binary = mm.get_params()
            best_param.append(param)
        masks[task] = binary
        del mm, paramslist
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        phases["mask_finalize_s"] += time.perf_counter() - t
    # final model: θ0 + τ_merged, uploaded once (the scripts then evaluate it)
    t = time.perf_counter()
    with torch.no_grad():
        final = [(p0 + tm).to(dev) for p0, tm in zip(pretrained, best_param[-1])]
    sync(dev)
    phases["final_model_s"] = time.perf_counter() - t
    del final, model, best_param, pretrained
    return {"phases": phases, "updates": updates, "masks": masks, "no_grad_keys": {},
            "selected_at_init": selected_at_init}
