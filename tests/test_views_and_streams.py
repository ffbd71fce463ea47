"""Every op on unaligned views of larger buffers, and on a side CUDA stream, against the reference.

Both tests run the same table of op calls (CASES). The CUDA kernels choose vectorized 16-byte
accesses only when every operand is aligned, so views at element offsets 1-3 (one operand at a
time, all alike, all different) reach the scalar fallbacks; in-place ops must not touch the
buffer around the view. On CUDA the ops must also run on the current stream: the inputs are
written on a side stream after a long sleep, so an op launched on another stream reads poison.
The CPU rows run the same bodies (with no stream), so the test logic itself is checked here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from calm_fast import ops, reference
from conftest import DTYPES, TOLERANCES, randn, sizes_for

EXACT = dict(atol=0.0, rtol=0.0)
ENTROPY_TOL = dict(atol=1e-4, rtol=1e-4)  # as tests/test_entropy_argmax.py
SUMSQ_TOL = dict(atol=0.0, rtol=1e-5)  # as tests/test_mask_ops.py: summation order differs
SLEEP_CYCLES = 50_000_000  # ~25-50 ms of GPU clock: far longer than launching the op


def _logits(n, gen):
    s = torch.randn(n, generator=gen) * 4
    s[::17] = 0.0  # sign(0) = -1 in the polarizing term
    s[1::13] = 5.0  # CALM's initial logits
    return s


@dataclass(frozen=True)
class Case:
    """One op call: `inputs(n, dtype, gen)` makes its operands (CPU, in operand order); `call(t,
    backend)` runs the op on them and returns its outputs (an in-place op: the operands it writes)."""

    inputs: Callable[[int, torch.dtype, torch.Generator], dict[str, torch.Tensor]]
    call: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
    tol: dict = field(default_factory=dict)  # output name -> tolerance, where not by dtype


def _mask_step(with_base):
    def inputs(n, dtype, gen):
        t = dict(logits=_logits(n, gen), weight=randn(n, dtype, gen, "cpu"),
                 grad=randn(n, dtype, gen, "cpu", scale=0.1), delta=randn(n, dtype, gen, "cpu", scale=0.5))
        return {**t, "base": randn(n, dtype, gen, "cpu")} if with_base else t

    def call(t, backend):
        ops.mask_step_(t["logits"], t["weight"], t["grad"], t["delta"], t.get("base"), lr=20.0, l1=0.7,
                       backend=backend)
        return {"logits": t["logits"], "weight": t["weight"]}

    return Case(inputs, call)


def _sumsq_inputs(n, dtype, gen):
    return dict(logits=_logits(n, gen), grad=randn(n, dtype, gen, "cpu", scale=0.1),
                delta=randn(n, dtype, gen, "cpu", scale=0.5))


def _sumsq_call(t, backend):
    return {"sumsq": ops.mask_grad_sumsq(t["logits"], t["grad"], t["delta"], backend=backend)}


def _masked_apply(mode):
    def inputs(n, dtype, gen):
        mask = _logits(n, gen)
        return dict(weight=randn(n, dtype, gen, "cpu"), delta=randn(n, dtype, gen, "cpu"),
                    mask=reference.pack_mask(mask) if mode == "packed" else mask)

    def call(t, backend):
        ops.masked_apply_(t["weight"], t["delta"], t["mask"], mode, backend=backend)
        return {"weight": t["weight"]}

    return Case(inputs, call)


def _task_vectors(n, dtype, gen):
    return {f"tau{i}": randn(n, dtype, gen, "cpu", scale=0.01) for i in range(3)}


def _consensus(method):
    thresholds = {"sum": (), "ties": (0.005,) * 3, "consensus": (0.4,) * 3}[method]  # ties: |τ| ~ 0.01

    def call(t, backend):
        return {"merged": ops.consensus_merge(list(t.values()), (0.3, 0.5, 0.7), thresholds, method, 2,
                                              backend=backend)}

    return Case(_task_vectors, call)


def _threshold_inputs(n, dtype, gen):  # three tensors of different sizes
    return {f"t{i}": randn(size, dtype, gen, "cpu") for i, size in enumerate((n, n // 3 + 1, 5))}


def _threshold_call(t, backend):
    k = sum(v.numel() for v in t.values()) // 3
    threshold, quota = ops.magnitude_threshold(list(t.values()), k, backend=backend)
    return {"threshold": threshold, "quota": quota}


def _entropy_inputs(n, dtype, gen):
    return {"logits": randn((3, n), dtype, gen, "cpu", scale=30.0)}


def _entropy_call(t, backend):
    entropy, argmax = ops.entropy_argmax(t["logits"], backend=backend)
    return {"entropy": entropy, "argmax": argmax}


def _packing_inputs(n, dtype, gen):
    values = torch.randn(n, generator=gen)
    values[::11] = 0.0  # zero is not > 0
    return dict(mask=values.to(dtype), bits=torch.rand(n, generator=gen) > 0.5,
                packed=torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8))


def _packing_call(t, backend):
    unpacked = ops.unpack_mask(t["packed"], t["mask"].numel(), backend=backend)
    return {"packed_float": ops.pack_mask(t["mask"], backend=backend),
            "packed_bool": ops.pack_mask(t["bits"], backend=backend),
            "unpacked": unpacked.view(torch.uint8)}  # bytes: a poisoned byte is no valid bool


CASES = {
    "mask_step-recover-base": _mask_step(False),
    "mask_step-base": _mask_step(True),
    "mask_grad_sumsq": Case(_sumsq_inputs, _sumsq_call, {"sumsq": SUMSQ_TOL}),
    **{f"masked_apply-{mode}": _masked_apply(mode) for mode in ("soft", "hard", "packed")},
    **{f"consensus_merge-{method}": _consensus(method) for method in ("sum", "ties", "consensus")},
    "magnitude_threshold": Case(_threshold_inputs, _threshold_call, {"threshold": EXACT}),
    "entropy_argmax": Case(_entropy_inputs, _entropy_call, {"entropy": ENTROPY_TOL}),
    "pack_unpack": Case(_packing_inputs, _packing_call),
}


def _expected(case, values):
    return case.call({k: v.clone() for k, v in values.items()}, "reference")


def _check(case, got, want, what):
    assert set(got) == set(want)
    for name, w in want.items():
        tol = case.tol.get(name, TOLERANCES.get(w.dtype, EXACT))
        torch.testing.assert_close(got[name].cpu(), w, **tol, msg=lambda m: f"{what}, {name}: {m}")


def _offset_patterns(count):
    """Element offsets per operand: all alike, all different, and one misaligned operand at a time
    (the others aligned), so that a kernel checking only some operands' alignment fails."""
    yield (3,) * count
    yield tuple(1 + i % 3 for i in range(count))
    for i in range(count):
        yield tuple(1 + i % 3 if j == i else 0 for j in range(count))


def _sentinel(dtype, index):
    """A fill for the buffer around operand `index`: distinct per operand, exact in its dtype, and
    not a fixed point of any op (a sweep past the view would change it)."""
    if dtype == torch.bool:
        return True
    return 0xA5 if dtype == torch.uint8 else (index + 1) * 0.375


PAD = 37  # elements after each view: more than any vector access could overrun


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_unaligned_views_match_reference(backend_device, name, dtype, gen):
    backend, device = backend_device
    case = CASES[name]
    # Tails of partial vectors and blocks; one Triton specialization of n (not 1, not % 16 == 0).
    for n in [s for s in sizes_for(backend_device) if s % 16 and 1 < s < 2**16]:
        values = case.inputs(n, dtype, gen)
        want = _expected(case, values)
        patterns = list(_offset_patterns(len(values)))
        if backend == "triton":  # Triton specializes on each pointer's alignment itself, and each
            patterns = patterns[:2]  # pattern of aligned operands would be a fresh GPU compile (~1 s)
        for offsets in patterns:
            buffers, views = {}, {}
            for i, ((key, v), off) in enumerate(zip(values.items(), offsets)):
                buf = torch.full((off + v.numel() + PAD,), _sentinel(v.dtype, i), dtype=v.dtype, device=device)
                views[key] = buf[off:off + v.numel()].view(v.shape)
                views[key].copy_(v)
                buffers[key] = (buf, off, v.numel(), buf.clone())
            what = f"n={n} offsets={offsets}"
            _check(case, case.call(views, backend), want, what)
            for key, (buf, off, size, before) in buffers.items():
                assert torch.equal(buf[:off], before[:off]), f"{what}: wrote before {key}"
                assert torch.equal(buf[off + size:], before[off + size:]), f"{what}: wrote after {key}"


def _poison(t):
    fill = float("nan") if t.is_floating_point() else (True if t.dtype == torch.bool else 0xFF)
    return torch.full_like(t, fill)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_ops_run_on_the_current_stream(backend_device, name, dtype, gen):
    """On CUDA: the operands hold poison until a side stream, after a long sleep, copies the
    inputs in; the op is called inside `torch.cuda.stream(side)` and must read the inputs, i.e.
    run ordered after that copy on the side stream. On CPU the same body with no stream."""
    backend, device = backend_device
    case = CASES[name]
    values = case.inputs(max(sizes_for(backend_device)), dtype, gen)
    want = _expected(case, values)
    sources = {k: v.to(device) for k, v in values.items()}
    operands = {k: _poison(v) for k, v in sources.items()}
    on_cuda = torch.device(device).type == "cuda"
    side = torch.cuda.Stream(device) if on_cuda else None
    if on_cuda:
        torch.cuda.synchronize(device)  # the poison is in place before the side stream starts
    with torch.cuda.stream(side) if on_cuda else contextlib.nullcontext():
        if on_cuda:
            torch.cuda._sleep(SLEEP_CYCLES)
        for k, v in sources.items():
            operands[k].copy_(v)  # the producer, queued behind the sleep
        got = case.call(operands, backend)
    if on_cuda:
        side.synchronize()
    _check(case, got, want, f"side stream, n={values[next(iter(values))].numel()}")
