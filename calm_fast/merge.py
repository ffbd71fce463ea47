"""calm_fast.merge(): the one call that merges fine-tuned models, with CALM or a data-free baseline."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field

import torch

from . import baselines, state
from .calm import CALMConfig, CALMMerger, CALMReport, merged_parameter

METHODS = ("calm",) + baselines.DATA_FREE_METHODS


@dataclass
class MergeResult:
    """Merged weights (same keys and dtypes as pretrained), CALM's packed masks and its report."""

    method: str
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # step task -> key -> bits
    report: CALMReport | None = None
    config: CALMConfig | baselines.DataFreeConfig | None = None

    def save_masks(self, path) -> None:
        """Bit-packed masks plus what replay() needs, loadable with torch.load(weights_only=True)."""
        if self.method != "calm":
            raise ValueError("calm_fast: only a CALM merge has masks to save")
        meta = {"initial": self.report.initial, "sequential": self.report.sequential,
                "no_grad_keys": self.report.no_grad_keys, "init_scaling": self.config.init_scaling}
        torch.save({"meta": json.dumps(meta), "masks": self.masks}, path)


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda iterable, **kw: tqdm(iterable, leave=False, **kw)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_output(merged: dict, pretrained: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, ref in pretrained.items():
        value = merged.get(key, ref)
        out[key] = value.detach().to(device=ref.device, dtype=ref.dtype).clone()
    return out


def merge(pretrained, finetuned, *, method: str = "calm", model=None, heads=None, data=None,
          forward=None, config=None, device=None, seed: int = 0, progress: bool = True) -> MergeResult:
    """Merge fine-tuned copies of `pretrained` into one multi-task model.

    pretrained: nn.Module, state dict or checkpoint path. finetuned: task name -> the same kinds
    (or a list of (name, weights) pairs). method: "calm", "task_arithmetic", "ties",
    "consensus", "average". CALM also needs `heads` (task -> frozen head: features -> logits),
    `data` (task -> unlabeled inputs: a tensor, a dict of tensors, or an iterable of batches)
    and `model` (the architecture; defaults to a copy of `pretrained` when it is a module);
    `forward(batch) -> features` replaces `model(batch)` for other call signatures.
    config: CALMConfig or DataFreeConfig. Deterministic under `seed` on CPU.
    """
    if method not in METHODS:
        raise ValueError(f"calm_fast: unknown method {method!r}; one of {METHODS}")
    device = _resolve_device(device)
    tasks = state.named_tasks(finetuned)
    base = state.load_state_dict(pretrained, what="pretrained")
    tuned = {name: state.load_state_dict(src, what=f"task {name!r}") for name, src in tasks.items()}
    keys = state.validate(base, tuned)
    bar = _progress(progress)
    torch.manual_seed(seed)

    if method != "calm":
        config = config or baselines.DataFreeConfig()
        if not isinstance(config, baselines.DataFreeConfig):
            raise TypeError(f"calm_fast: method {method!r} takes a DataFreeConfig, got {type(config).__name__}")
        merged = baselines.merge_data_free(base, tuned, keys, method, config, device, bar)
        return MergeResult(method, _as_output(merged, base), config=config)

    config = config or CALMConfig()
    if not isinstance(config, CALMConfig):
        raise TypeError(f"calm_fast: method 'calm' takes a CALMConfig, got {type(config).__name__}")
    for what, given in (("heads", heads), ("data", data)):
        if given is None:
            raise ValueError(f"calm_fast: method 'calm' needs {what} for every task")
        missing = sorted(set(tasks) - set(given))
        if missing:
            raise ValueError(f"calm_fast: no {what[:-1] if what == 'heads' else what} for task(s) {missing}")
    if model is None:
        if not isinstance(pretrained, torch.nn.Module):
            raise ValueError("calm_fast: method 'calm' needs `model` when pretrained is not an nn.Module")
        model = copy.deepcopy(pretrained)
    model = model.to(device)
    merger = CALMMerger(base, tuned, keys, model, heads, data, forward, config, device, seed, bar)
    merged, masks, report = merger.run()
    return MergeResult("calm", _as_output(merged, base), masks, report, config)


def replay(pretrained, finetuned, masks_path, *, device=None) -> dict[str, torch.Tensor]:
    """Rebuild CALM's merged weights from base + task weights + a saved mask file, with no data."""
    device = _resolve_device(device)
    saved = torch.load(masks_path, map_location="cpu", weights_only=True)
    meta = json.loads(saved["meta"])
    tasks = state.named_tasks(finetuned)
    base = state.load_state_dict(pretrained, what="pretrained")
    tuned = {name: state.load_state_dict(src, what=f"task {name!r}") for name, src in tasks.items()}
    keys = state.validate(base, tuned)
    absent = sorted((set(meta["initial"]) | set(meta["sequential"])) - set(tuned))
    if absent:
        raise ValueError(f"calm_fast: the masks were made with task(s) {absent} that are not given")
    merged = {}
    for key in keys:
        steps = [(task, None if key in meta["no_grad_keys"][task] else saved["masks"][task][key].to(device))
                 for task in meta["sequential"]]
        merged[key] = merged_parameter(key, base, tuned, meta["initial"], meta["init_scaling"], steps, device)
    return _as_output(merged, base)


def report_json(result: MergeResult) -> str:
    """The report of a merge as JSON (mask densities, pseudo-label counts, timings...)."""
    payload = {"method": result.method, "config": {k: str(v) for k, v in asdict(result.config).items()}}
    if result.report is not None:
        payload["report"] = asdict(result.report)
    return json.dumps(payload, indent=2)
