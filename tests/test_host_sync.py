"""No op waits for the device: nothing inside an op reads a value back to the host.

On CPU (Triton's interpreter) the host reads of calm_fast's own code are counted by patching
the torch calls that sync on a GPU (and by a dispatch mode for the aten ops they end in); the
interpreter itself makes such calls, so only call sites in calm_fast's files count. Where a GPU
exists, every op runs under CUDA's sync debug mode and is replayed from a captured CUDA graph.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import calm_fast
from calm_fast import ops
from conftest import HAS_TRITON, TOLERANCES, backend_params

N = 5000  # a few blocks of every kernel
W, THR = [0.5, -1.0, 2.0], [0.3, 0.8, 0.1]


def _randn(gen, n, dtype=torch.float32):
    return torch.randn(n, generator=gen).to(dtype)


def _ties(gen, sizes, dtype):
    """Magnitudes in steps of 1/4: many ties, so the tie quotas are not trivial."""
    return [(torch.randint(-8, 9, (n,), generator=gen) / 4).to(dtype) for n in sizes]


def _mask_step(xs, backend):
    ops.mask_step_(*xs, lr=0.5, backend=backend)
    return xs[0], xs[1]


def _masked_apply(xs, backend):
    ops.masked_apply_(*xs, "soft", backend=backend)
    return xs[:1]


def _merge(method):
    return lambda xs, backend: (ops.consensus_merge(xs, W, THR, method, 2, backend=backend),)


def _threshold(xs, backend):
    return ops.magnitude_threshold(xs, sum(x.numel() for x in xs) // 3, backend=backend)


# case -> (inputs from a generator: a list of CPU tensors, the op on them returning its outputs
# (an in-place op: the tensors it updates), outputs compared exactly)
CASES = {
    "mask_step_": (lambda g: [_randn(g, N) for _ in range(4)], _mask_step, False),
    "mask_grad_sumsq": (lambda g: [_randn(g, N) for _ in range(3)],
                        lambda xs, b: (ops.mask_grad_sumsq(*xs, backend=b),), False),
    "masked_apply_": (lambda g: [_randn(g, N) for _ in range(3)], _masked_apply, False),
    "consensus_merge-sum": (lambda g: [_randn(g, N) for _ in W], _merge("sum"), False),
    "consensus_merge-ties": (lambda g: [_randn(g, N) for _ in W], _merge("ties"), False),
    "consensus_merge-consensus": (lambda g: [_randn(g, N) for _ in W], _merge("consensus"), False),
    "magnitude_threshold-fp32": (lambda g: _ties(g, [3000, 0, 1000, 5, 2049], torch.float32), _threshold, True),
    "magnitude_threshold-bf16": (lambda g: _ties(g, [3000, 0, 1000, 5, 2049], torch.bfloat16), _threshold, True),
    "entropy_argmax": (lambda g: [torch.randn(33, 1000, generator=g)],
                       lambda xs, b: ops.entropy_argmax(xs[0], backend=b), False),
    "pack_mask": (lambda g: [_randn(g, N)], lambda xs, b: (ops.pack_mask(xs[0], backend=b),), True),
    "unpack_mask": (lambda g: [torch.randint(0, 256, (N // 8,), generator=g, dtype=torch.uint8)],
                    lambda xs, b: (ops.unpack_mask(xs[0], N, backend=b),), True),
}


def _compare(got, want, exact):
    for g, w in zip(got, want, strict=True):
        if g.is_floating_point() and not exact:
            torch.testing.assert_close(g, w, **TOLERANCES[torch.float32])
        else:
            assert torch.equal(g, w), f"{g} != {w}"


# --- CPU: host reads from calm_fast's own code -------------------------------------------------

# Tensor methods that read device memory on the host: on a GPU each waits for the stream.
HOST_READS = ("cpu", "item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")
TORCH_DIR = str(Path(torch.__file__).parent)


def _first_caller_outside_torch(frame):
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame


class _Recorder(TorchDispatchMode):
    """Host reads whose first caller outside torch lies in calm_fast's files. As a dispatch
    mode it sees the aten ops every read of a value ends in (item, int(), bool(), nonzero)."""

    SYNC_OPS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero)

    def __init__(self, roots):
        super().__init__()
        self.roots, self.calls = roots, []

    def record(self, what, frame):
        frame = _first_caller_outside_torch(frame)
        if frame is not None and frame.f_code.co_filename.startswith(self.roots):
            self.calls.append(f"{what} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNC_OPS:
            self.record(str(func), sys._getframe(1))
        return func(*args, **(kwargs or {}))


def _watch(recorder, name, original):
    def wrapper(self, *args, **kwargs):
        # .to(device) without non_blocking: a blocking copy, which on a GPU waits either way.
        blocking_copy = name == "to" and not kwargs.get("non_blocking", False) and (
            "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args))
        if name != "to" or blocking_copy:
            recorder.record(f"Tensor.{name}", sys._getframe(1))
        return original(self, *args, **kwargs)
    return wrapper


def _watch_tensor_factory(recorder, original):
    def wrapper(*args, **kwargs):
        if kwargs.get("device") is not None:  # host data copied to the device, blocking
            recorder.record("torch.tensor(device=...)", sys._getframe(1))
        return original(*args, **kwargs)
    return wrapper


@pytest.fixture
def host_reads(monkeypatch):
    """A recorder of calm_fast's host reads (its .calls) while the test runs."""
    roots = tuple(str(Path(m.__file__).parent) + "/" for m in (calm_fast, ops._triton_module()))
    recorder = _Recorder(roots)
    for name in HOST_READS + ("to",):
        monkeypatch.setattr(torch.Tensor, name, _watch(recorder, name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", _watch_tensor_factory(recorder, torch.tensor))
    return recorder


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CASES)
def test_triton_op_reads_nothing_back_on_cpu(case, host_reads, gen):
    make, op, _ = CASES[case]
    xs = make(gen)
    with host_reads:
        op(xs, "triton")
    assert not host_reads.calls, "host reads:\n" + "\n".join(host_reads.calls)


def test_recorder_sees_host_reads_from_calm_fast(host_reads):
    """The recorder is live: calm_fast's reference reads values back (int() of sums)."""
    x = torch.tensor([1.0, 2.0, 3.0])
    with host_reads:
        calm_fast.reference.magnitude_threshold([x], 2)
        x.sum().item()  # this file is not calm_fast: not recorded
    assert host_reads.calls and all("reference.py" in c for c in host_reads.calls)


def test_recorder_sees_aten_ops_that_read_values():
    """The dispatch side: the aten ops under torch calls that read a value (here called from
    this file, taken as the watched code)."""
    recorder = _Recorder((__file__,))
    x = torch.tensor([0.0, 2.0])
    with recorder:
        torch.nonzero(x)
        bool(x.any())
    assert [c.split(" at ")[0] for c in recorder.calls] == ["aten.nonzero.default", "aten._local_scalar_dense.default"]


# --- CUDA: sync debug mode and graph capture ---------------------------------------------------

CUDA_BACKENDS = backend_params((("native", "cuda"), ("triton", "cuda")))


def _on_cuda(xs):
    return [x.to("cuda") for x in xs]


def _cuda_case(backend_cuda, case, gen):
    """(backend, op, exact comparison, fresh inputs on the GPU) of a case."""
    make, op, exact = CASES[case]
    return backend_cuda[0], op, exact, _on_cuda(make(gen))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_cuda", CUDA_BACKENDS)
def test_op_runs_without_sync_cuda(backend_cuda, case, gen):
    backend, op, _, xs = _cuda_case(backend_cuda, case, gen)
    op(xs, backend)  # warm-up: compiles the Triton kernels, caches the device tables
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        op(xs, backend)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_cuda", CUDA_BACKENDS)
def test_op_replays_from_cuda_graph_cuda(backend_cuda, case, gen):
    backend, op, exact, static = _cuda_case(backend_cuda, case, gen)
    make = CASES[case][0]
    side = torch.cuda.Stream()  # warm up off the default stream before capturing (torch's docs)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            op(static, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(static, backend)
    for _ in range(2):
        fresh = make(gen)
        for s, f in zip(static, fresh):  # fresh inputs; restores what an in-place op updated
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        _compare(out, op(_on_cuda(fresh), "reference"), exact)
