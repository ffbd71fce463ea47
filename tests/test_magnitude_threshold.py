"""magnitude_threshold: exact k-th largest |x| over a list of tensors, with tie quotas."""
import collections
import importlib

import pytest
import torch

from calm_fast import ops, reference
from conftest import DTYPES, sizes_for


def _tensors(sizes, dtype, gen, device, ties):
    out = []
    for n in sizes:
        t = torch.randint(-4, 5, (n,), generator=gen).float() if ties else torch.randn(n, generator=gen)
        out.append(t.to(dtype).to(device))
    return out


def _select(tensors, threshold, quota):
    """The exactly-k selection the outputs describe, as one flat bool vector."""
    picks = []
    for t, q in zip(tensors, quota.tolist()):
        mag = t.abs().reshape(-1)
        pick = mag > threshold
        tie_idx = torch.nonzero(mag == threshold).flatten()[:q]
        pick[tie_idx] = True
        picks.append(pick)
    return torch.cat(picks)


def _topk_by_order(tensors, k):
    """Exactly-k selection by brute force: sort (|x| desc, tensor order, index) and take k."""
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
    order = torch.argsort(-flat, stable=True)  # stable keeps (tensor, index) order among ties
    pick = torch.zeros(flat.numel(), dtype=torch.bool)
    pick[order[:k]] = True
    return pick


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "many-ties"])
def test_threshold_matches_reference(backend_device, dtype, ties, gen):
    backend, device = backend_device
    for n in sizes_for(backend_device):
        sizes = [n, 0, max(n // 3, 1), 5]  # several tensors, one empty
        tensors = _tensors(sizes, dtype, gen, device, ties)
        total = sum(sizes)
        for k in sorted({0, 1, total // 3, total - 1, total}):
            want_thr, want_quota = reference.magnitude_threshold(tensors, k)
            thr, quota = ops.magnitude_threshold(tensors, k, backend=backend)
            assert thr.dtype == dtype and thr.dim() == 0 and quota.dtype == torch.int64
            assert torch.equal(thr.cpu(), want_thr.cpu()), f"n={n} k={k}: {thr} != {want_thr}"
            assert torch.equal(quota.cpu(), want_quota.cpu()), f"n={n} k={k}"
            cpu = [t.cpu() for t in tensors]
            picked = _select(cpu, thr.cpu(), quota.cpu())
            assert int(picked.sum()) == k
            assert torch.equal(picked, _topk_by_order(cpu, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_over_many_unaligned_views(backend_device, dtype, gen):
    """Dozens of tensors (the kernels' per-chunk owner table) that are views of one buffer at
    addresses that are not 16-byte aligned (the unvectorized loads), with many ties."""
    backend, device = backend_device
    sizes = torch.randint(0, 300, (40,), generator=gen).tolist() + [5000]
    buffer = _tensors([sum(sizes) + len(sizes)], dtype, gen, device, ties=True)[0]
    tensors, offset = [], 1  # one element of gap before each view: odd addresses
    for n in sizes:
        tensors.append(buffer[offset:offset + n])
        offset += n + 1
    assert any(t.data_ptr() % 16 for t in tensors)
    total = sum(sizes)
    for k in (1, total // 2, total):
        want_thr, want_quota = reference.magnitude_threshold(tensors, k)
        thr, quota = ops.magnitude_threshold(tensors, k, backend=backend)
        assert torch.equal(thr.cpu(), want_thr.cpu()), f"k={k}: {thr} != {want_thr}"
        assert torch.equal(quota.cpu(), want_quota.cpu()), f"k={k}"


def test_reference_threshold_matches_concatenated_topk(gen):
    tensors = _tensors([1000, 37, 4096], torch.float32, gen, "cpu", ties=False)
    flat = torch.cat(tensors).abs()
    for k in (1, 10, 2000, flat.numel()):
        thr, _ = reference.magnitude_threshold(tensors, k)
        assert float(thr) == float(flat.topk(k).values[-1])


def test_nan_orders_above_inf(any_backend):
    backend, device = any_backend
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0], device=device)
    thr, quota = ops.magnitude_threshold([x], 1, backend=backend)
    assert torch.isnan(thr) and quota.tolist() == [1]
    thr, _ = ops.magnitude_threshold([x], 2, backend=backend)
    assert float(thr) == float("inf")


def _check_against_reference(tensors, k, backend):
    want_thr, want_quota = reference.magnitude_threshold(tensors, k)
    thr, quota = ops.magnitude_threshold(tensors, k, backend=backend)
    assert torch.equal(thr.cpu(), want_thr.cpu()), f"k={k}: {thr} != {want_thr}"
    assert torch.equal(quota.cpu(), want_quota.cpu()), f"k={k}"


def test_threshold_over_hundreds_of_tensors(backend_device, gen):
    """The select step sums the histogram rows of every tensor, in tiles of rows."""
    backend, device = backend_device
    sizes = torch.randint(0, 5, (300,), generator=gen).tolist()
    _check_against_reference(_tensors(sizes, torch.bfloat16, gen, device, ties=True), sum(sizes) // 2, backend)


def test_lists_seen_again_read_their_current_data(backend_device, gen, monkeypatch):
    """A list passed again with new contents at the same addresses (the Triton backend's cached
    table), and after more lists than that cache holds (its table evicted), gives exact results."""
    backend, device = backend_device
    module = None
    if backend == "triton":
        module = importlib.import_module("calm_fast.triton_kernels.magnitude_threshold")
        monkeypatch.setattr(module, "TABLE_CACHE_SIZE", 4)
        monkeypatch.setattr(module, "_TABLES", collections.OrderedDict())
    lists = [_tensors([50, 0, 7], torch.bfloat16, gen, device, ties=True) for _ in range(6)]
    for tensors in lists:
        _check_against_reference(tensors, 20, backend)
    for tensors in lists[:2] + lists[-1:]:  # evicted, evicted, cached
        tensors[0].copy_(_tensors([50], torch.bfloat16, gen, device, ties=True)[0])
        _check_against_reference(tensors, 20, backend)
    if module is not None:
        assert len(module._TABLES) == 4
