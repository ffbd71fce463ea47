"""The op benchmark's cases: per op, how its inputs are made, how each implementation is called,
which outputs are compared, and its minimal traffic (the byte models of benchmarks/ops)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from calm_fast import _meta, ops as cf_ops, reference

from . import eager
from .sizes import human, vit_like_shapes

OPS = _meta.OPS


@dataclass
class Case:
    op: str
    label: str                       # what distinguishes cases of one op (dtype, mode, method)
    dtype: str
    size: int                        # elements (per task for consensus; B*C for entropy)
    shape: str
    nbytes: int                      # minimal traffic per call (see BYTE MODELS)
    make: Callable                   # (generator) -> dict of inputs
    call: Callable                   # (impl, inputs) -> result
    outputs: Callable                # (inputs, result) -> list of tensors to compare
    mutates: bool = False
    tol: dict = field(default_factory=lambda: dict(rtol=1e-4, atol=1e-6))
    impls: dict = field(default_factory=dict)


def _randn(n, gen, device, scale=1.0, dtype=torch.float32):
    t = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def _es(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_label(dt) -> str:
    return "bf16" if dt == torch.bfloat16 else "fp32"


def mask_step_cases(n: int, dev, args) -> list[Case]:
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        def make(gen, n=n, dt=dt):
            return dict(S=_randn(n, gen, dev, 3.0), W=_randn(n, gen, dev, 0.02, dt),
                        G=_randn(n, gen, dev, 1e-3, dt), D=_randn(n, gen, dev, 1e-3, dt))
        cases.append(Case(
            "mask_step_", _dtype_label(dt), str(dt).split(".")[-1], n, f"({human(n)},)", n * (8 + 4 * _es(dt)), make,
            lambda f, i: f(i["S"], i["W"], i["G"], i["D"], None, lr=1e4, l1=1.0, reg="polarize"),
            lambda i, r: [i["S"], i["W"]], mutates=True,
            tol=dict(rtol=2e-2, atol=1e-5) if dt == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)))
    return cases


def mask_grad_sumsq_cases(n: int, dev, args) -> list[Case]:
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        def make(gen, n=n, dt=dt):
            return dict(S=_randn(n, gen, dev, 3.0), G=_randn(n, gen, dev, 1e-3, dt), D=_randn(n, gen, dev, 1e-3, dt))
        cases.append(Case(
            "mask_grad_sumsq", _dtype_label(dt), str(dt).split(".")[-1], n, f"({human(n)},)", n * (4 + 2 * _es(dt)),
            make, lambda f, i: f(i["S"], i["G"], i["D"]), lambda i, r: [r], tol=dict(rtol=1e-4, atol=0)))
    return cases


def masked_apply_cases(n: int, dev, args) -> list[Case]:
    cases = []
    for mode in ("hard", "packed"):
        def make(gen, n=n, mode=mode):
            s = _randn(n, gen, dev)
            m = s if mode == "hard" else reference.pack_mask(s)
            return dict(W=_randn(n, gen, dev, 0.02), D=_randn(n, gen, dev, 1e-3), M=m)
        nb = n * 16 if mode == "hard" else n * 12 + (n + 7) // 8
        cases.append(Case(
            "masked_apply_", mode, "float32", n, f"({human(n)},)", nb, make,
            lambda f, i, mode=mode: f(i["W"], i["D"], i["M"], mode), lambda i, r: [i["W"]], mutates=True))
    return cases


def pack_mask_cases(n: int, dev, args) -> list[Case]:
    cases = []
    for dt in (torch.float32, torch.bool):
        def make(gen, n=n, dt=dt):
            s = _randn(n, gen, dev)
            return dict(M=s if dt == torch.float32 else s > 0)
        cases.append(Case(
            "pack_mask", "bool" if dt == torch.bool else "fp32", str(dt).split(".")[-1], n,
            f"({human(n)},)", n * _es(dt) + (n + 7) // 8, make,
            lambda f, i: f(i["M"]), lambda i, r: [r], tol=dict(rtol=0, atol=0)))
    return cases


def unpack_mask_cases(n: int, dev, args) -> list[Case]:
    def make(gen, n=n):
        return dict(P=reference.pack_mask(_randn(n, gen, dev)), n=n)
    return [Case("unpack_mask", "bool", "uint8", n, f"({human((n + 7) // 8)},) bytes", (n + 7) // 8 + n, make,
                 lambda f, i: f(i["P"], i["n"]), lambda i, r: [r], tol=dict(rtol=0, atol=0))]


def consensus_merge_cases(n: int, dev, args) -> list[Case]:
    cases, T = [], args.tasks
    for method in ("sum", "ties", "consensus"):
        def make(gen, n=n):
            return dict(taus=[_randn(n, gen, dev, 1e-3 * (1 + 0.1 * t)) for t in range(T)])
        weights = [0.3] * T
        if method == "ties":  # keep ~top 20 % of each task vector (|x| >= 1.2816 sigma)
            thresholds = [1.2816e-3 * (1 + 0.1 * t) for t in range(T)]
        elif method == "consensus":  # TALL masks, lambda_t = 0.4, k = 2 votes
            thresholds = [0.4] * T
        else:
            thresholds = []
        votes = 2 if method == "consensus" else 0
        cases.append(Case(
            "consensus_merge", f"{method} T={T}", "float32", n, f"{T} x ({human(n)},)", (T + 1) * n * 4, make,
            lambda f, i, w=weights, th=thresholds, m=method, v=votes: f(i["taus"], w, th, m, v),
            lambda i, r: [r], tol=dict(rtol=1e-4, atol=1e-8)))
    return cases


def magnitude_threshold_cases(n: int, dev, args) -> list[Case]:
    shapes = vit_like_shapes(n)
    k = max(1, int(1e-5 * n))

    def make(gen, shapes=shapes):
        out = []
        for j, s in enumerate(shapes):
            scale = 10.0 ** (-4.0 + 1.5 * ((j * 0.618034) % 1.0))  # per-tensor 1e-4..3e-3
            out.append(_randn(math.prod(s), gen, dev, scale).reshape(s))
        return dict(tensors=out)
    return [Case("magnitude_threshold", f"k={k}", "float32", n, f"{len(shapes)} tensors", n * 4, make,
                 lambda f, i, k=k: f(i["tensors"], k),
                 lambda i, r: [r[0] if isinstance(r, (tuple, list)) else r], tol=dict(rtol=0, atol=0))]


def entropy_argmax_cases(shape: tuple[int, int], dev, args) -> list[Case]:
    b, c = shape

    def make(gen, b=b, c=c):
        return dict(Z=_randn(b * c, gen, dev, 3.0).reshape(b, c))
    return [Case("entropy_argmax", f"C={c}", "float32", b * c, f"({b}, {c})", b * c * 4 + 12 * b, make,
                 lambda f, i: f(i["Z"]), lambda i, r: list(r), tol=dict(rtol=1e-4, atol=1e-4))]


# op -> (the option listing its sizes, the builder of its cases at one size): every op of
# calm_fast._meta.OPS has one (tests/test_torch_integration.py::test_every_op_is_complete)
CASES = {
    "mask_step_": ("sizes", mask_step_cases),
    "mask_grad_sumsq": ("sizes", mask_grad_sumsq_cases),
    "masked_apply_": ("sizes", masked_apply_cases),
    "pack_mask": ("sizes", pack_mask_cases),
    "unpack_mask": ("sizes", unpack_mask_cases),
    "consensus_merge": ("consensus_sizes", consensus_merge_cases),
    "magnitude_threshold": ("threshold_sizes", magnitude_threshold_cases),
    "entropy_argmax": ("entropy_shapes", entropy_argmax_cases),
}


def build_cases(args, device) -> list[Case]:
    """Every case of the ops args.ops names, at each of its sizes, in OPS order then by size."""
    cases = []
    for op, (sizes, builder) in CASES.items():
        if op in args.ops:
            for size in getattr(args, sizes):
                cases += builder(size, device, args)
    order = {op: j for j, op in enumerate(OPS)}
    cases.sort(key=lambda c: (order[c.op], c.size))
    return cases


def variant_impl(case: Case, variant: str):
    """The implementation a variant times: eager, torch.compile(eager), or the calm_fast op on a backend."""
    if variant == "eager":
        return getattr(eager, case.op)
    if variant == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile-limit surprises
        return torch.compile(getattr(eager, case.op), dynamic=False)
    backend = variant
    fn = getattr(cf_ops, case.op)

    def run(*a, **kw):
        return fn(*a, backend=backend, **kw)
    return run
