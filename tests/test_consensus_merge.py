"""consensus_merge (task arithmetic, TIES, TALL/consensus) against the reference."""
import pytest
import torch

from calm_fast import ops, reference
from conftest import DTYPES, TOLERANCES, backend_params, sizes_for


def _task_vectors(num_tasks, n, dtype, gen, device, quantized):
    out = []
    for _ in range(num_tasks):
        if quantized:  # multiples of 1/8: exact ties in every comparison the vote makes
            t = torch.randint(-6, 7, (n,), generator=gen).float() / 8
        else:
            t = torch.randn(n, generator=gen) * 0.01
        out.append(t.to(dtype).to(device))
    return out


@pytest.mark.parametrize("method", ["sum", "ties", "consensus"])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantized", [False, True], ids=["random", "ties"])
def test_consensus_merge_matches_reference(backend_device, method, num_tasks, dtype, quantized, gen):
    backend, device = backend_device
    for n in sizes_for(backend_device):
        taus = _task_vectors(num_tasks, n, dtype, gen, device, quantized)
        weights = (torch.rand(num_tasks, generator=gen) * 0.8 + 0.2).tolist()
        if method == "ties":  # trim at each task's exact 70th-percentile magnitude
            thresholds = [float(reference.magnitude_threshold([t], int(0.3 * n))[0]) for t in taus]
        else:
            thresholds = (torch.rand(num_tasks, generator=gen) * 0.6 + 0.2).tolist()
        min_votes = min(2, num_tasks)
        want = reference.consensus_merge(taus, weights, thresholds, method, min_votes)
        got = ops.consensus_merge(taus, weights, thresholds, method, min_votes, backend=backend)
        assert got.dtype == dtype and got.shape == taus[0].shape
        torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=f"n={n}")


def test_baselines_match_textbook_formulas(any_backend, gen):
    """Task arithmetic, TIES and TALL written the obvious way on a stacked [T, N] tensor."""
    backend, device = any_backend
    taus = _task_vectors(4, 999, torch.float32, gen, device, quantized=False)
    stacked = torch.stack(taus)
    lam = 0.3
    got = ops.consensus_merge(taus, [lam] * 4, method="sum", backend=backend)
    torch.testing.assert_close(got, lam * stacked.sum(0))

    thr = stacked.abs().quantile(0.8, dim=1, keepdim=True)
    trimmed = torch.where(stacked.abs() >= thr, stacked, 0.0)
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    ties = lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    got = ops.consensus_merge(taus, [lam] * 4, thr.flatten().tolist(), "ties", backend=backend)
    torch.testing.assert_close(got, ties)

    tall = stacked.abs() >= 0.4 * (stacked.sum(0) - stacked).abs()
    consensus = torch.where(tall.sum(0) >= 2, lam * stacked.sum(0), 0.0)
    got = ops.consensus_merge(taus, [lam] * 4, [0.4] * 4, "consensus", 2, backend=backend)
    torch.testing.assert_close(got, consensus)


@pytest.mark.parametrize("method", ["sum", "ties", "consensus"])
@pytest.mark.parametrize("num_tasks", [65, 250])
@pytest.mark.parametrize("native", backend_params((("native", "cpu"), ("native", "cuda"))))
def test_consensus_merge_many_tasks(native, method, num_tasks, gen):
    """Above 64 tasks the CUDA kernel reads its task table from device memory, uploaded through
    kernel arguments (250 tasks: 500 words, two upload launches). Not Triton: it unrolls its loops
    over the tasks at compile time, for a few tasks."""
    backend, device = native
    n = 1003
    taus = _task_vectors(num_tasks, n, torch.float32, gen, device, quantized=True)
    weights = (torch.rand(num_tasks, generator=gen) + 0.1).tolist()
    thresholds = (torch.rand(num_tasks, generator=gen) * 0.6 + 0.2).tolist()
    want = reference.consensus_merge(taus, weights, thresholds, method, 3)
    got = ops.consensus_merge(taus, weights, thresholds, method, 3, backend=backend)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
