"""Tensors of N = 2**31 + 13 elements, where an int32 index or counter would overflow.

Marked `large` (run with --large; scripts/test.sh runs this file as its own step). Inputs are
drawn chunk by chunk from random bits, each chunk a function of (seed, start), so a chunk can be
drawn again instead of keeping a copy; the reference runs on chunks, so memory stays about the
inputs'. The last chunk is exactly the tail past 2**31 (TAIL), where an overflow shows.
On 2 CPU cores shared with other jobs the file took 2.3 minutes with THP_MEM_ALLOC_ENABLE=1
(as scripts/test.sh runs it) and peaked at 12.3 GiB RSS (mask_grad_sumsq; /usr/bin/time -v).
masked_apply_ "hard" needs 16 GiB of inputs, so it runs on a GPU only.
"""
import contextlib
import gc
import sys

import pytest
import torch

from calm_fast import _extension, _meta, ops, reference
from conftest import HAS_CUDA, backend_params, poison_cuda_cache

pytestmark = pytest.mark.large

N = 2**31 + 13
TAIL = slice(2**31, N)
# Elements per chunk of generation and reference. CPU: under torch's parallel grain (32768), so
# each chunk op runs on the calling thread: an OpenMP region per small op costs more than it saves,
# and minutes when other processes share the cores. GPU: few launches (the GPU run gives a minute).
CHUNK = {"cpu": 2**14, "cuda": 2**27}
GiB = 2**30
CPU_BUDGET = 14 * GiB  # peak RSS this file must stay under on a CPU


@pytest.fixture(params=backend_params((("native", "cpu"), ("native", "cuda"), ("triton", "cuda"))))
def backend_device(request):
    """No Triton on CPU: its interpreter would take hours at this size."""
    return request.param


@pytest.fixture
def poisoned_allocations():
    """Overrides conftest's: input generation and the chunked reference allocate ~20x the inputs
    in temporaries, and junk-filling them all doubles the run time. Poison around op calls only."""
    yield


@contextlib.contextmanager
def _poisoned_cpu_allocations():
    if _extension.NATIVE:
        _extension._C.set_cpu_poison(True)
    try:
        yield
    finally:
        if _extension.NATIVE:
            _extension._C.set_cpu_poison(False)


@pytest.fixture(autouse=True)
def release_memory():
    """Free each test's tensors before the next: pytest keeps a failing test's frame (with ~10 GiB
    of locals) in sys.last_traceback for post-mortem debugging."""
    yield
    sys.last_type = sys.last_value = sys.last_traceback = None
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


def _require(nbytes, device):
    """Skip when the inputs plus ~1 GiB of reference chunks exceed the budget: CPU_BUDGET on a CPU,
    the free memory on a GPU."""
    budget = CPU_BUDGET if device == "cpu" else torch.cuda.mem_get_info()[0]
    if nbytes + GiB > budget:
        pytest.skip(f"needs {(nbytes + GiB) / GiB:.1f} GiB, the {device} budget is {budget / GiB:.1f} GiB")


def _seeds(gen, count):
    return torch.randint(2**40, (count,), generator=gen).tolist()


def _chunks(device, n=N):
    """Slices of [0, n); CHUNK divides 2**31, so with n = N the last one is exactly TAIL."""
    step = CHUNK[device]
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _random(sl, seed, dtype, device):
    """Random bits as `dtype` for the flat indices `sl`; the same ones for the same (seed, sl.start)."""
    n = sl.stop - sl.start
    g = torch.Generator(device=device).manual_seed(seed + sl.start)
    words = torch.empty(-(-n * dtype.itemsize // 8), dtype=torch.int64, device=device)
    return words.random_(-2**63, 2**63 - 1, generator=g).view(dtype)[:n]


def _bf16(sl, seed, device):
    """bf16 in ±[0.5, 2) (exponent 126 or 127): θ + δ != θ, so an element left unwritten shows."""
    bits = _random(sl, seed, torch.int16, device)
    return ((bits & 0xFF) | (bits & -0x8000) | 0x3F00).view(torch.bfloat16)


def _filled(n, dtype, device, draw):
    out = torch.empty(n, dtype=dtype, device=device)
    for sl in _chunks(device, n):
        out[sl] = draw(sl)
    return out


@pytest.mark.parametrize("mode", ["packed", "hard"])
def test_masked_apply_bf16(backend_device, mode, gen):
    """θ += m·δ with bf16 θ and δ, the tail masked on so that each of its elements must change.
    m is 0 or 1: one fp32 add rounded once, so every backend gives the reference's bits."""
    backend, device = backend_device
    _require(N * (4 + (4 if mode == "hard" else 1 / 8)), device)
    seed_w, seed_d, seed_m = _seeds(gen, 3)
    weight = _filled(N, torch.bfloat16, device, lambda sl: _bf16(sl, seed_w, device))
    delta = _filled(N, torch.bfloat16, device, lambda sl: _bf16(sl, seed_d, device))
    if mode == "packed":
        mask = _filled(_meta.packed_numel(N), torch.uint8, device, lambda sl: _random(sl, seed_m, torch.uint8, device))
        mask[TAIL.start // 8:] = reference.pack_mask(torch.ones(N - TAIL.start, dtype=torch.bool, device=device))
        mask_of = lambda sl: mask[sl.start // 8:_meta.packed_numel(sl.stop)]  # noqa: E731
    else:
        mask = _filled(N, torch.float32, device, lambda sl: _bf16(sl, seed_m, device).float())
        mask[TAIL] = 1.0
        mask_of = lambda sl: mask[sl]  # noqa: E731
    ops.masked_apply_(weight, delta, mask, mode, backend=backend)
    for sl in _chunks(device):
        want = _bf16(sl, seed_w, device)
        reference.masked_apply_(want, delta[sl], mask_of(sl), mode)
        assert torch.equal(weight[sl].view(torch.int16), want.view(torch.int16)), f"elements [{sl.start}, {sl.stop})"


def test_mask_grad_sumsq_bf16(backend_device, gen):
    """Σ (g·δ·σ'(S))² with g and δ one bf16 tensor (4 GiB less). The 13 tail elements (g = 128,
    S = 0) hold about half the sum, each ~4%: a tail element skipped or read from the wrong index
    moves the sum far beyond the tolerance (fp32 partial sums on a GPU)."""
    backend, device = backend_device
    _require(N * 6, device)
    seed_s, seed_g = _seeds(gen, 2)
    logits = _filled(N, torch.float32, device, lambda sl: _bf16(sl, seed_s, device).float())
    grad = _filled(N, torch.bfloat16, device, lambda sl: _bf16(sl, seed_g, device))
    logits[TAIL], grad[TAIL] = 0.0, 128.0
    got = ops.mask_grad_sumsq(logits, grad, grad, backend=backend)
    want = sum(float(reference.mask_grad_sumsq(logits[sl], grad[sl], grad[sl])) for sl in _chunks(device))
    assert got.shape == () and got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_pack_unpack_round_trip_bool(backend_device, gen):
    """pack_mask then unpack_mask of a random bool mask, both outputs poisoned before the call;
    N % 8 = 5, so the last byte is partial (its trailing bits must be 0)."""
    backend, device = backend_device
    (seed,) = _seeds(gen, 1)
    mask = _filled(N, torch.uint8, device, lambda sl: _random(sl, seed, torch.uint8, device) & 1).view(torch.bool)
    poison_cuda_cache(_meta.packed_numel(N), device)
    with _poisoned_cpu_allocations():
        packed = ops.pack_mask(mask, backend=backend)
    assert packed.shape == (_meta.packed_numel(N),)
    for sl in _chunks(device):
        assert torch.equal(packed[sl.start // 8:_meta.packed_numel(sl.stop)], reference.pack_mask(mask[sl])), \
            f"bytes of elements [{sl.start}, {sl.stop})"
    poison_cuda_cache(N, device)
    with _poisoned_cpu_allocations():
        unpacked = ops.unpack_mask(packed, N, backend=backend)
    assert unpacked.dtype == torch.bool and unpacked.shape == (N,)
    for sl in _chunks(device):  # bytes, not truth values: a poisoned byte is not a valid bool
        assert torch.equal(unpacked[sl].view(torch.uint8), mask[sl].view(torch.uint8)), \
            f"elements [{sl.start}, {sl.stop})"


def test_magnitude_threshold_bf16(backend_device, gen):
    """k = 1 finds the unique max, placed at the last index; k = N - 2 (> 2**31) the third smallest
    |x|, with a tie quota. The oracle is a histogram of the 2**15 magnitudes, built chunk by chunk
    (the reference sorts a concatenation: 16 GiB of int64 here)."""
    backend, device = backend_device
    (seed,) = _seeds(gen, 1)
    bits = _filled(N, torch.int16, device, lambda sl: _random(sl, seed, torch.int16, device) & ~0x4000)
    x = bits.view(torch.bfloat16)
    x[-1] = 3.0  # |x| < 2 elsewhere: exponent < 128
    counts = torch.zeros(2**15, dtype=torch.int64, device=device)
    for sl in _chunks(device):
        counts += torch.bincount(bits[sl] & 0x7FFF, minlength=2**15)
    at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[b]: entries whose |x| bits are >= b
    for k in (1, N - 2):
        threshold, quota = ops.magnitude_threshold([x], k, backend=backend)
        kth = int((at_least >= k).nonzero().max())  # the k-th largest |x|, as bits
        assert threshold.reshape(1).view(torch.int16).item() == kth, f"k={k}"
        assert quota.tolist() == [k - int(at_least[kth] - counts[kth])], f"k={k}"
