"""The native ops behave as proper torch ops: opcheck, torch.compile, CUDA registration."""
import importlib
import os
import re

import pytest
import torch

from calm_fast import _extension, _meta, ops, reference
from calm_fast._source_tree import import_subpackage
from conftest import HAS_TRITON, REPO

pytestmark = pytest.mark.skipif(not _extension.NATIVE, reason="native extension not built")
OPS = _meta.OPS


def _samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, generator=g)
    s = torch.randn(37, generator=g)
    taus = [torch.randn(37, generator=g) for _ in range(3)]
    return {
        "mask_step_": [(s.clone(), x.clone(), torch.randn(37, generator=g), x, None, 3.0, 1.0, "polarize"),
                       (s.clone(), x.clone(), x, x, x.clone(), 3.0, 1.0, "l1")],
        "mask_grad_sumsq": [(s, x, x), (s, x, x.to(torch.bfloat16))],
        "masked_apply_": [(x.clone(), x, s, "soft"), (x.clone(), x, reference.pack_mask(s), "packed")],
        "consensus_merge": [(taus, [0.3, 0.3, 0.3], [], "sum", 0),
                            (taus, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], "ties", 0),
                            (taus, [1.0, 1.0, 1.0], [0.4, 0.4, 0.4], "consensus", 2)],
        "magnitude_threshold": [(taus, 10), (taus, 0)],
        "entropy_argmax": [(torch.randn(5, 7, generator=g),)],
        "pack_mask": [(s,), (s > 0,)],
        "unpack_mask": [(reference.pack_mask(s), 37)],
    }


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op = getattr(torch.ops.calm_fast, name)
    for args in _samples()[name]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    def merge_step(logits, weight, grad, delta, taus):
        norm = torch.ops.calm_fast.mask_grad_sumsq(logits, grad, delta)
        torch.ops.calm_fast.mask_step_(logits, weight, grad, delta, None, 2.0, 1.0, "polarize")
        merged = torch.ops.calm_fast.consensus_merge(taus, [0.5] * len(taus), [], "sum", 0)
        packed = torch.ops.calm_fast.pack_mask(logits)
        h, i = torch.ops.calm_fast.entropy_argmax(weight.reshape(-1, 4))
        return merged, packed, h, i, norm

    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(64, generator=g) for _ in range(4)]
    taus = [torch.randn(64, generator=g) for _ in range(3)]
    eager_in = [t.clone() for t in inputs]
    want = merge_step(*eager_in, taus)
    compiled = torch.compile(merge_step, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs, taus)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(inputs[0], eager_in[0])
    torch.testing.assert_close(inputs[1], eager_in[1])


@pytest.mark.skipif(not _extension.NATIVE_CUDA and not os.environ.get("CALM_FAST_REQUIRE_CUDA_BUILD"),
                    reason="extension built without CUDA kernels")
def test_cuda_kernels_are_registered():
    """CI builds and links the CUDA kernels on a GPU-less machine: every op must have one."""
    assert _extension.NATIVE_CUDA, "CALM_FAST_REQUIRE_CUDA_BUILD is set but _C has no CUDA kernels"
    missing = [n for n in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"calm_fast::{n}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


def test_cpu_kernels_are_registered():
    missing = [n for n in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"calm_fast::{n}", "CPU")]
    assert not missing, f"no CPU kernel registered for {missing}"


def test_auto_backend_picks_native_on_cpu():
    assert ops.resolve_backend(torch.device("cpu")) == "native"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_op_is_complete():
    """A half-added op fails here: every op of the schema registry (and no other) has a Python
    entry point, a reference, a Triton kernel, a fake, a CPU kernel, a CUDA kernel registration in
    kernels/cuda, an eager baseline and a benchmark case."""
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("calm_fast::")}
    assert registered == set(OPS)
    cuda_sources = "".join(p.read_text() for p in (REPO / "kernels" / "cuda").glob("*.cu"))
    cuda_registered = set(re.findall(r'm\.impl\("(\w+)"', cuda_sources))
    bench = f"{import_subpackage('benchmarks').__name__}.ops"
    eager = importlib.import_module(f"{bench}.eager")
    args, device = importlib.import_module(f"{bench}.run").parse_args(["--quick", "--device", "cpu"])
    benchmarked = {case.op for case in importlib.import_module(f"{bench}.cases").build_cases(args, device)}
    from torch._library.simple_registry import singleton

    for name in OPS:
        assert callable(getattr(ops, name, None)) and callable(getattr(reference, name, None)), name
        assert callable(getattr(ops._triton_module(), name, None)), f"{name}: no Triton kernel"
        assert singleton.find(f"calm_fast::{name}").fake_impl.kernel is not None, f"{name}: no fake"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"calm_fast::{name}", "CPU"), f"{name}: no CPU kernel"
        assert name in cuda_registered, f"{name}: no CUDA kernel registered in kernels/cuda"
        assert callable(getattr(eager, name, None)), f"{name}: no eager baseline"
        assert name in benchmarked, f"{name}: no benchmark case"
