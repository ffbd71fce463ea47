"""calm_fast.merge(): the one call that merges fine-tuned models, with CALM or a data-free baseline."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from . import baselines, maskfile, methods, state
from .calm import CALMConfig, CALMReport, merged_parameter
from .checkpoint import DEFAULT_MAX_SHARD_BYTES, LazyStateDict, atomic_directory, spec, write_safetensors_dir

METHODS = tuple(methods.METHODS)
MASKS_FILE = "masks.safetensors"
REPORT_FILE = "report.json"


@dataclass
class MergeResult:
    """Merged weights (same keys and dtypes as pretrained), CALM's packed masks and its report."""

    method: str
    state_dict: dict[str, torch.Tensor]
    masks: maskfile.Masks | None = None  # CALM: masks.bits[step task][key] = packed uint8 mask
    report: CALMReport | None = None
    config: CALMConfig | baselines.DataFreeConfig | None = None

    def save_masks(self, path) -> None:
        """The bit-packed masks plus what replay() needs (maskfile.py), one safetensors file."""
        if self.masks is None:
            raise ValueError("calm_fast: only a CALM merge has masks to save")
        maskfile.write(path, self.masks)

    def save(self, path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
             progress: bool = False) -> None:
        """A folder: the weights as (sharded) safetensors, masks.safetensors for CALM, report.json.
        Written under a temporary name and renamed: an interrupted save leaves nothing behind."""
        def write(folder):
            write_safetensors_dir(self.state_dict, folder, max_shard_bytes=max_shard_bytes,
                                  metadata={"calm_fast_method": self.method}, progress=progress_bar(progress))
            if self.masks is not None:
                maskfile.write(os.path.join(folder, MASKS_FILE), self.masks)
            with open(os.path.join(folder, REPORT_FILE), "w") as f:
                f.write(report_json(self))

        atomic_directory(os.fspath(path), write, overwrite=overwrite)


def progress_bar(enabled: bool = True):
    """iterable, **tqdm options -> a progress-bar-wrapped iterable; None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda iterable, **kw: tqdm(iterable, leave=False, **kw)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_output(merged: dict, pretrained) -> dict[str, torch.Tensor]:
    """Every key of pretrained in its order and dtype: merged values (taken out of `merged` one at
    a time, so memory stays at one model) and copies of the carried entries."""
    out = {}
    for key in pretrained:
        if key not in merged:
            out[key] = pretrained[key].clone()
            continue
        device = "cpu" if isinstance(pretrained, LazyStateDict) else pretrained[key].device
        out[key] = merged.pop(key).detach().to(device=device, dtype=spec(pretrained, key)[1], copy=True)
    return out


def load_inputs(pretrained, finetuned, bar=None):
    tasks = state.named_tasks(finetuned)
    base = state.load_state_dict(pretrained, what="pretrained")
    items = list(tasks.items())
    tuned = {name: state.load_state_dict(src, what=f"task {name!r}")
             for name, src in (bar(items, desc="loading") if bar else items)}
    return base, tuned, state.validate(base, tuned)


def merge(pretrained, finetuned, *, method: str = "calm", model=None, heads=None, data=None,
          forward=None, augment=None, config=None, device=None, seed: int = 0, progress: bool = True,
          progress_file=None, output=None, overwrite: bool = False,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> MergeResult:
    """Merge fine-tuned copies of `pretrained` into one multi-task model.

    pretrained: nn.Module, state dict or checkpoint path. finetuned: task name -> the same kinds
    (or a list of (name, weights) pairs). method: "calm", "task_arithmetic", "ties",
    "consensus", "average". CALM also needs `heads` (task -> frozen head: features -> logits),
    `data` (task -> unlabeled inputs: a tensor, a dict of tensors, or an iterable of batches)
    and `model` (the architecture; defaults to a copy of `pretrained` when it is a module);
    `forward(batch) -> features` replaces `model(batch)` for other call signatures.
    `augment(batch, generator) -> batch` (CALM) is applied to each batch the masks train on,
    never to scoring or checks (random crops, say: a small unlabeled pool then fits less); it
    draws its randomness from `generator` (a CPU torch.Generator) so runs stay deterministic.
    config: CALMConfig or DataFreeConfig. Deterministic under `seed` on CPU.
    progress_file (CALM): a path where each finished sequential step is saved; a run that finds
    it (same tasks, config, seed, parameters, data sizes) continues after its last step.
    Checkpoint paths are read lazily (safetensors): the data-free methods then hold one
    parameter per task at a time, not T models.
    output: also save the result there (MergeResult.save). Inside an initialized process group
    of several ranks (torchrun) every rank calls merge() alike and output is required: CALM
    runs on the model sharded by FSDP2, the data-free methods split the parameters
    (calm_fast.distributed), each rank writes its part and the result reads output back lazily.
    """
    chosen, config = _checked_config(method, config)
    if _in_process_group():
        return _merge_distributed(chosen, pretrained, finetuned, config, output, overwrite, max_shard_bytes,
                                  model=model, heads=heads, data=data, forward=forward, augment=augment,
                                  device=device, seed=seed, progress=progress_bar(progress),
                                  progress_file=progress_file)
    result = _merge_here(chosen, pretrained, finetuned, config, device, seed, progress, progress_file,
                         model=model, heads=heads, data=data, forward=forward, augment=augment)
    if output is not None:
        result.save(output, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
    return result


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _merge_distributed(chosen, pretrained, finetuned, config, output, overwrite, max_shard_bytes, *, model, heads,
                       data, forward, augment, device, seed, progress, progress_file) -> MergeResult:
    from . import distributed

    if chosen.needs_data:
        return distributed.merge_calm(pretrained, finetuned, model=model, heads=heads, data=data, forward=forward,
                                      augment=augment, config=config, output=output, seed=seed, device=device,
                                      max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                                      progress_file=progress_file, progress=progress)
    return distributed.merge_data_free(pretrained, finetuned, chosen.name, config, output, seed=seed, device=device,
                                       max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def _merge_here(chosen, pretrained, finetuned, config, device, seed, progress, progress_file, *, model, heads,
                data, forward, augment) -> MergeResult:
    device = resolve_device(device)
    bar = progress_bar(progress)
    base, tuned, keys = load_inputs(pretrained, finetuned, bar)
    torch.manual_seed(seed)
    inputs = methods.MergeInputs(pretrained, base, tuned, keys, device, bar, seed, model, heads, data, forward,
                                 None if progress_file is None else os.fspath(progress_file), augment)
    chosen.validate(config, len(tuned))
    chosen.check_inputs(inputs)
    merged = chosen.run(inputs, config)
    return MergeResult(chosen.name, _as_output(merged.values, base), merged.masks, merged.report, config)


def _checked_config(method: str, config) -> tuple[methods.MergeMethod, object]:
    """The registered method and its config (the defaults when None), of the right class."""
    chosen = methods.get(method)
    return chosen, chosen.config(config)


def check(pretrained, finetuned, *, method: str = "calm", model=None, heads=None, data=None, config=None,
          progress: bool = False) -> dict:
    """Everything merge() validates, without merging: config, keys, shapes, dtypes, CALM's heads /
    data / model, and every tensor read once for NaN/Inf. Returns a summary of the merge."""
    chosen, config = _checked_config(method, config)
    bar = progress_bar(progress)
    base, tuned, keys = load_inputs(pretrained, finetuned, bar)
    chosen.validate(config, len(tuned))
    chosen.check_inputs(methods.MergeInputs(pretrained, base, tuned, keys, torch.device("cpu"), model=model,
                                            heads=heads, data=data))
    every = [base, *tuned.values()]
    for weights in (bar(every, desc="reading") if bar else every):
        for key in keys:
            weights[key]  # a lazy checkpoint checks each tensor for NaN/Inf as it is read
    specs = {k: spec(base, k) for k in base}
    return {"method": method, "tasks": list(tuned), "merged_parameters": len(keys),
            "carried_entries": len(base) - len(keys),
            "merged_scalars": sum(specs[k][0].numel() for k in keys),
            "model_bytes": sum(shape.numel() * dtype.itemsize for shape, dtype in specs.values())}


def replay(pretrained, finetuned, masks_path, *, device=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Rebuild CALM's merged weights from base + task weights + a saved mask file, with no data."""
    device = resolve_device(device)
    masks, _, _ = maskfile.read(masks_path)
    bar = progress_bar(progress)
    base, tuned, keys = load_inputs(pretrained, finetuned, bar)
    maskfile.check_fits(masks, base, keys, tuned, masks_path)
    merged = {key: merged_parameter(key, base, tuned, masks.initial, masks.init_scaling,
                                    masks.steps(key, device), device)
              for key in (bar(keys, desc="replaying") if bar else keys)}
    return _as_output(merged, base)


def report_json(result: MergeResult) -> str:
    """The report of a merge as JSON (mask densities, pseudo-label counts, timings...)."""
    from . import __version__

    payload = {"method": result.method, "calm_fast_version": __version__,
               "config": maskfile.config_as_json(result.config)}
    if result.report is not None:
        payload["report"] = asdict(result.report)
    return json.dumps(payload, indent=2)
