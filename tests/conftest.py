"""Shared test machinery: the (backend, device) matrix, fresh seeds, poisoned allocations."""
from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "csrc"))  # csrc/build_lists.py: what setup.py builds, for the build tests

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton kernels run on CPU tensors through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import calm_fast  # noqa: E402  (after TRITON_INTERPRET is set)
from calm_fast import _extension  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
# The GPU run (benchmarks/gpu_run.sh) sets CALM_FAST_REQUIRE_GPU=1: there, a GPU test that would
# skip (no device, a CPU-only build, no triton) fails instead, so a green run means it ran.
REQUIRE_GPU = os.environ.get("CALM_FAST_REQUIRE_GPU") == "1"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
SESSION_SEED = int(os.environ.get("CALM_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))

# Tolerances for outputs stored in each dtype, against the fp32 reference rounded the same way:
# fp32 allows a few ulps of exp/fma differences; bf16/fp16 allow two ulps of the stored value.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
DTYPES = list(TOLERANCES)

# Sizes around the kernels' block boundaries. Triton's interpreter costs ~2 ms per program,
# so its CPU runs stop at a few blocks.
NATIVE_SIZES = [0, 1, 7, 1000, 4095, 4096, 4097, 2**20 + 3]
INTERPRETER_SIZES = [0, 1, 7, 1000, 4099]


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true",
                     help="also run the tests marked large (tensors over 2**31 elements, ~10 GiB of memory)")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: tensors over 2**31 elements; run only with --large")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--large"):
        return
    skip = pytest.mark.skip(reason="large tensors: run with --large (scripts/test.sh runs them as their own step)")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CALM_FAST_REQUIRE_GPU=1 a skipped CUDA test is reported as failed (see REQUIRE_GPU)."""
    report = yield
    if REQUIRE_GPU and report.skipped and "cuda" in item.nodeid.lower():
        report.outcome = "failed"
        report.longrepr = f"CALM_FAST_REQUIRE_GPU=1 but this CUDA test skipped: {report.longrepr}"
    return report


def pytest_report_header(config):
    return (f"calm_fast: native={_extension.NATIVE} cpu_isa={_extension.CPU_ISA} native_cuda={_extension.NATIVE_CUDA} "
            f"cuda={HAS_CUDA} triton={HAS_TRITON} seed={SESSION_SEED} "
            f"(rerun with CALM_FAST_TEST_SEED={SESSION_SEED})")


KERNEL_BACKENDS = (("native", "cpu"), ("triton", "cpu"), ("native", "cuda"), ("triton", "cuda"))


def backend_params(pairs):
    params = []
    for backend, device in pairs:
        reason = None
        if device == "cuda" and not HAS_CUDA:
            reason = "no CUDA device on this machine"
        elif backend == "native" and not _extension.NATIVE:
            reason = f"native extension not built: {_extension.LOAD_ERROR}"
        elif backend == "native" and device == "cuda" and not _extension.NATIVE_CUDA:
            reason = "native extension built without CUDA"
        elif backend == "triton" and not HAS_TRITON:
            reason = "triton is not installed"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


@pytest.fixture(params=backend_params(KERNEL_BACKENDS))
def backend_device(request):
    """(backend, device) pairs of every kernel; missing ones skip with the reason."""
    return request.param


@pytest.fixture(params=backend_params(KERNEL_BACKENDS + (("reference", "cpu"),)))
def any_backend(request):
    """The kernels and the reference itself: for tests whose oracle is not the reference."""
    return request.param


def sizes_for(backend_device):
    backend, device = backend_device
    return INTERPRETER_SIZES if (backend, device) == ("triton", "cpu") else NATIVE_SIZES


@pytest.fixture
def gen(request):
    """A generator seeded per test from the session seed: fresh inputs every session."""
    seed = SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """Every new CPU allocation is filled with a NaN pattern while a test runs."""
    if _extension.NATIVE:
        _extension._C.set_cpu_poison(True)
    yield
    if _extension.NATIVE:
        _extension._C.set_cpu_poison(False)


def poison_cuda_cache(nbytes: int, device) -> None:
    """Leave a NaN-filled block in the CUDA caching allocator so the next same-size output reuses it."""
    if torch.device(device).type == "cuda" and nbytes:
        torch.full((nbytes // 4 + 1,), float("nan"), device=device)


def randn(shape, dtype, gen, device, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
