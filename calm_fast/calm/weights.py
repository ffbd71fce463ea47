"""The merged weights CALM optimizes: the model's own tensors, and how a merge is rebuilt from
θ0, the task weights and the finished steps' masks."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .. import ops
from ..checkpoint import spec


def default_forward(model: torch.nn.Module) -> Callable:
    def forward(batch):
        return model(**batch) if isinstance(batch, Mapping) else model(batch)

    return forward


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def merged_parameter(key, pretrained, finetuned, initial, scaling: float, steps, device,
                     part: Callable[[torch.Tensor], torch.Tensor] = _whole) -> torch.Tensor:
    """One parameter of a CALM merge (or `part` of it), rebuilt from θ0, the task weights and the
    finished steps.

    steps: (task, packed mask bits of that part, or None where the parameter got no gradient) in
    order. CALM itself rebuilds its base this way after each step, so replaying saved masks
    reproduces its merged weights bit for bit; every operation is elementwise, so a part is
    bit-identical to the same rows of the whole.
    """
    theta0 = part(pretrained[key]).to(device, torch.float32)
    taus = [(part(finetuned[t][key]).to(device, torch.float32) - theta0).contiguous() for t in initial]
    current = theta0 + ops.consensus_merge(taus, [scaling] * len(taus)) if taus else theta0.clone()
    for task, bits in steps:
        delta = (part(finetuned[task][key]).to(device, torch.float32) - current).contiguous()
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


def trainable_tensors(model: torch.nn.Module, heads: Mapping, keys, device) -> dict[str, torch.Tensor]:
    """The model's tensors for `keys` (by state-dict key), the only ones that take gradients;
    the rest of the model and the heads are frozen, everything in eval mode."""
    own = model.state_dict(keep_vars=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for head in heads.values():
        if isinstance(head, torch.nn.Module):
            head.to(device).eval().requires_grad_(False)
    tensors = {k: own[k] for k in keys}
    for t in tensors.values():
        if isinstance(t, torch.nn.Parameter):
            t.requires_grad_(True)
    model.eval()
    return tensors
