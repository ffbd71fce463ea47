"""Input contracts of the calm_fast ops, and their fake (meta) implementations.

The checks here are the Python side of each op's contract: the reference and Triton paths
call them, and the fake implementations (used by torch.compile and opcheck) call them too.
The C++ kernels enforce the same contract with TORCH_CHECK_VALUE / TORCH_CHECK_TYPE, so a bad
input raises ValueError / TypeError with the same wording on every backend.
"""
from __future__ import annotations

import torch

# Every op of torch.ops.calm_fast, in the README's order: the one list that the op dispatch, the
# backends, the benchmarks and the tests are checked against (tests/test_torch_integration.py).
OPS = ("mask_step_", "mask_grad_sumsq", "masked_apply_", "consensus_merge", "magnitude_threshold", "entropy_argmax",
       "pack_mask", "unpack_mask")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_STEP_REGS = ("polarize", "l1", "none")
MASK_MODES = ("soft", "hard", "packed")
CONSENSUS_METHODS = ("sum", "ties", "consensus")


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"calm_fast.{op}: {msg}")


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, bfloat16 or float16, got {t.dtype}", TypeError)


def _check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous")


def _check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.shape != ref.shape:
        _fail(op, f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
    _check_contiguous(op, name, t)


def _check_logits_and_operands(op: str, logits, **operands) -> None:
    """What the mask ops share: fp32 contiguous logits, and float operands shaped like them."""
    if logits.dtype != torch.float32:
        _fail(op, f"logits must be float32, got {logits.dtype}", TypeError)
    _check_contiguous(op, "logits", logits)
    for name, t in operands.items():
        _check_float(op, name, t)
        _check_same(op, "logits", logits, name, t)


def check_mask_step(logits, weight, grad, delta, base, reg) -> None:
    op = "mask_step_"
    _check_logits_and_operands(op, logits, weight=weight, grad=grad, delta=delta)
    if base is not None:
        _check_same(op, "logits", logits, "base", base)
    for name, t in (("grad", grad), ("base", base)):
        if t is not None and t.dtype != weight.dtype:
            _fail(op, f"{name} must have weight's dtype {weight.dtype}, got {t.dtype}", TypeError)
    if reg not in MASK_STEP_REGS:
        _fail(op, f"reg must be one of {MASK_STEP_REGS}, got {reg!r}")


def check_mask_grad_sumsq(logits, grad, delta) -> None:
    _check_logits_and_operands("mask_grad_sumsq", logits, grad=grad, delta=delta)


def packed_numel(numel: int) -> int:
    return (numel + 7) // 8


def check_masked_apply(weight, delta, mask, mode) -> None:
    op = "masked_apply_"
    _check_float(op, "weight", weight)
    _check_float(op, "delta", delta)
    _check_contiguous(op, "weight", weight)
    _check_same(op, "weight", weight, "delta", delta)
    if mode not in MASK_MODES:
        _fail(op, f"mode must be one of {MASK_MODES}, got {mode!r}")
    if mode == "packed":
        if mask.dtype != torch.uint8:
            _fail(op, f"a packed mask must be uint8, got {mask.dtype}", TypeError)
        if mask.device != weight.device:
            _fail(op, f"mask is on {mask.device} but weight is on {weight.device}")
        if mask.dim() != 1 or mask.numel() != packed_numel(weight.numel()):
            _fail(op, f"a packed mask for {weight.numel()} scalars must have shape "
                      f"({packed_numel(weight.numel())},), got {tuple(mask.shape)}")
        _check_contiguous(op, "mask", mask)
    else:
        if mask.dtype != torch.float32:
            _fail(op, f"mask logits must be float32, got {mask.dtype}", TypeError)
        _check_same(op, "weight", weight, "mask", mask)


def check_consensus_merge(task_vectors, weights, thresholds, method, min_votes) -> None:
    op = "consensus_merge"
    if len(task_vectors) == 0:
        _fail(op, "needs at least one task vector")
    first = task_vectors[0]
    _check_float(op, "task_vectors[0]", first)
    for i, t in enumerate(task_vectors):
        _check_same(op, "task_vectors[0]", first, f"task_vectors[{i}]", t)
        if t.dtype != first.dtype:
            _fail(op, f"task_vectors[{i}] has dtype {t.dtype} but task_vectors[0] has {first.dtype}",
                  TypeError)
    if method not in CONSENSUS_METHODS:
        _fail(op, f"method must be one of {CONSENSUS_METHODS}, got {method!r}")
    if len(weights) != len(task_vectors):
        _fail(op, f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    if method != "sum" and len(thresholds) != len(task_vectors):
        _fail(op, f"method {method!r} needs one threshold per task vector, got {len(thresholds)}")
    if method == "consensus" and not 0 <= min_votes <= len(task_vectors):
        _fail(op, f"min_votes must lie in [0, {len(task_vectors)}], got {min_votes}")


def check_magnitude_threshold(tensors, k) -> None:
    op = "magnitude_threshold"
    if len(tensors) == 0:
        _fail(op, "needs at least one tensor")
    first = tensors[0]
    _check_float(op, "tensors[0]", first)
    total = 0
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype:
            _fail(op, f"tensors[{i}] has dtype {t.dtype} but tensors[0] has {first.dtype}", TypeError)
        if t.device != first.device:
            _fail(op, f"tensors[{i}] is on {t.device} but tensors[0] is on {first.device}")
        _check_contiguous(op, f"tensors[{i}]", t)
        total += t.numel()
    if not 0 <= k <= total:
        _fail(op, f"k must lie in [0, {total}] (the number of scalars), got {k}")


def check_entropy_argmax(logits) -> None:
    op = "entropy_argmax"
    _check_float(op, "logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        _fail(op, f"logits must have shape [B, C] with C >= 1, got {tuple(logits.shape)}")
    _check_contiguous(op, "logits", logits)


def check_pack_mask(mask) -> None:
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        _fail("pack_mask", f"mask must be bool or a float dtype, got {mask.dtype}", TypeError)
    _check_contiguous("pack_mask", "mask", mask)


def check_unpack_mask(packed, numel) -> None:
    op = "unpack_mask"
    if packed.dtype != torch.uint8:
        _fail(op, f"packed must be uint8, got {packed.dtype}", TypeError)
    if numel < 0 or packed.dim() != 1 or packed.numel() != packed_numel(numel):
        _fail(op, f"packed must have shape ({packed_numel(max(numel, 0))},) for numel={numel}, "
                  f"got {tuple(packed.shape)}")
    _check_contiguous(op, "packed", packed)


def register_fakes() -> None:
    """Fake implementations so torch.compile and opcheck can trace the C++ ops."""
    lib = "calm_fast::"

    @torch.library.register_fake(lib + "mask_step_")
    def _(logits, weight, grad, delta, base, lr, l1, reg):
        check_mask_step(logits, weight, grad, delta, base, reg)

    @torch.library.register_fake(lib + "mask_grad_sumsq")
    def _(logits, grad, delta):
        check_mask_grad_sumsq(logits, grad, delta)
        return logits.new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "masked_apply_")
    def _(weight, delta, mask, mask_mode):
        check_masked_apply(weight, delta, mask, mask_mode)

    @torch.library.register_fake(lib + "consensus_merge")
    def _(task_vectors, weights, thresholds, method, min_votes):
        check_consensus_merge(task_vectors, weights, thresholds, method, min_votes)
        return torch.empty_like(task_vectors[0])

    @torch.library.register_fake(lib + "magnitude_threshold")
    def _(tensors, k):
        check_magnitude_threshold(tensors, k)
        first = tensors[0]
        return (first.new_empty(()),
                torch.empty(len(tensors), dtype=torch.int64, device=first.device))

    @torch.library.register_fake(lib + "entropy_argmax")
    def _(logits):
        check_entropy_argmax(logits)
        rows = logits.shape[0]
        return (logits.new_empty(rows, dtype=torch.float32),
                logits.new_empty(rows, dtype=torch.int64))

    @torch.library.register_fake(lib + "pack_mask")
    def _(mask):
        check_pack_mask(mask)
        return mask.new_empty(packed_numel(mask.numel()), dtype=torch.uint8)

    @torch.library.register_fake(lib + "unpack_mask")
    def _(packed, numel):
        check_unpack_mask(packed, numel)
        return packed.new_empty(numel, dtype=torch.bool)
