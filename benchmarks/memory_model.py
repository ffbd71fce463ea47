"""CALM's memory per rank on N ranks of FSDP2, on paper: what benchmarks/distributed_calm.py sets
beside its measured peaks, and tabulates for models a CPU cannot run.

Per rank (calm_fast/distributed/fsdp.py, calm_fast/calm/mask.py):
- sharded, 1/N each: the merged parameters P·b_param, their gradients P·b_grad, the mask
  logits S (fp32, 4·P) and δ = θj − θ (P·b_delta);
- whole while in use (N > 1 only): the largest unit outside the blocks (fsdp.shard_model makes
  each of the root's children a unit: embeddings, LM head, the stem) and two blocks (the running
  one and the prefetched one), parameters + gradients;
- activations: an input (a figure given), not modeled.
One process (N = 1) holds everything whole and gathers nothing.
"""
from __future__ import annotations

from .harness import GiB, table_header

LOGIT_BYTES = 4  # S is fp32 whatever the parameters' dtype
HEADROOM = 0.10  # a GPU "fits" when the state leaves this fraction of its memory free
GPUS = {"H100 80GB": 81559 * 2**20, "H200 141GB": 143771 * 2**20}  # nvidia-smi's memory.total
# name -> (parameters, largest block, largest unit outside the blocks), all in parameters
MODELS = {
    "ViT-bigG-14 image tower": (1.84e9, 38.3e6, 3.5e6),  # width 1664, MLP 8192, 48 blocks
    "Llama 7B": (6.74e9, 202e6, 131e6),  # 32 layers; embeddings and LM head 131M each
    "Llama 70B": (68.98e9, 856e6, 262e6),  # 80 layers; embeddings and LM head 262M each
}
RANKS = (1, 2, 4, 8)
BF16 = 2


def per_rank_bytes(params: float, block: float, root: float = 0, ranks: int = 1, param_bytes: int = BF16,
                   grad_bytes: int = BF16, delta_bytes: int = BF16, activations: float = 0) -> dict:
    """The bytes one rank holds at CALM's peak (the mask updates), by part, and their total."""
    sharded = params * (param_bytes + grad_bytes + LOGIT_BYTES + delta_bytes) / ranks
    whole_units = 0 if ranks == 1 else (root + 2 * block) * (param_bytes + grad_bytes)
    return {"sharded": sharded, "whole_units": whole_units, "activations": activations,
            "total": sharded + whole_units + activations}


def gpu_rows() -> list[dict]:
    """Each model on 1..8 GPUs, bf16 parameters, gradients and δ: GiB per rank and GiB left for
    activations under the headroom on each GPU (negative: it does not fit)."""
    rows = []
    for name, (params, block, root) in MODELS.items():
        for ranks in RANKS:
            total = per_rank_bytes(params, block, root, ranks)["total"]
            rows.append({"model": name, "params": params, "ranks": ranks, "per_rank_gib": total / GiB,
                         "whole_model_gib": params * BF16 / GiB,
                         "left_gib": {gpu: ((1 - HEADROOM) * size - total) / GiB for gpu, size in GPUS.items()}})
    return rows


def gpu_table(rows: list[dict]) -> list[str]:
    """The markdown table of gpu_rows()."""
    lines = table_header(["model", "P", "N", "per rank GiB", *(f"{g}: left GiB" for g in GPUS),
                          "host memory per rank at load (bf16) GiB"], "llrr" + "r" * (len(GPUS) + 1))
    for row in rows:
        left = [f"{v:.1f} {'fits' if v > 0 else '**no**'}" for v in row["left_gib"].values()]
        lines.append(f"| {row['model']} | {row['params'] / 1e9:.2f}e9 | {row['ranks']} | {row['per_rank_gib']:.1f} | "
                     + " | ".join(left) + f" | {row['whole_model_gib']:.1f} |")
    return lines


def saved_activation_bytes(model, inputs) -> int:
    """Bytes autograd saves for backward in one forward of `inputs` (the model's own parameters
    excluded, shared storages counted once): a measured activations term."""
    import torch

    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        model(inputs)
    return sum(saved.values())


NOTES = ("Per rank: (P·b_param + P·b_grad + 4·P (S) + P·b_delta) / N, plus for N > 1 the largest other unit and two "
         "blocks whole (parameters + gradients), plus activations. Not modeled: the Python/torch baseline (subtracted from "
         "the measured peaks), the checkpoints' file pages read lazily (in VmHWM, not in anon), transient fp32 "
         "copies (θj of one tensor, a gathered tensor), the output file rank 0 holds whole while writing (host "
         "memory, ≤ max_shard_bytes), the whole architecture each rank builds in host memory before fully_shard "
         "moves it to the device unit by unit (a load-time P·b_param of host memory), and memory the allocator keeps after it is freed.")
