"""mask_step_, mask_grad_sumsq and masked_apply_ against the plain-torch reference."""
import pytest
import torch

from calm_fast import _extension, ops, reference
from conftest import DTYPES, TOLERANCES, randn, sizes_for


def _logits(n, gen, device):
    s = torch.randn(n, generator=gen) * 4
    s[::17] = 0.0  # sign(0) = -1 in the polarizing term
    s[1::13] = 5.0  # CALM's initial logits are exactly ±5
    return s.to(device)


@pytest.mark.parametrize("reg", ["polarize", "l1", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True], ids=["recover-base", "base"])
def test_mask_step_matches_reference(backend_device, reg, dtype, delta_dtype, with_base, gen):
    backend, device = backend_device
    for n in sizes_for(backend_device):
        logits = _logits(n, gen, device)
        weight = randn(n, dtype, gen, device)
        grad = randn(n, dtype, gen, device, scale=0.1)
        delta = randn(n, delta_dtype, gen, device, scale=0.5)
        base = randn(n, dtype, gen, device) if with_base else None
        lr, l1 = 20.0, 0.7
        want_s, want_w = logits.clone(), weight.clone()
        reference.mask_step_(want_s, want_w, grad, delta, base, lr, l1, reg)
        ops.mask_step_(logits, weight, grad, delta, base, lr=lr, l1=l1, reg=reg, backend=backend)
        torch.testing.assert_close(logits, want_s, **TOLERANCES[torch.float32], msg=f"logits n={n}")
        torch.testing.assert_close(weight, want_w, **TOLERANCES[dtype], msg=f"weight n={n}")


def test_mask_step_recovers_base_exactly_in_fp32(any_backend, gen):
    """Without `base`, θ is rebuilt from θ − σ(S_old)·δ: it must equal base + σ(S_new)·δ."""
    backend, device = any_backend
    n = 1000
    logits, delta = _logits(n, gen, device), randn(n, torch.float32, gen, device)
    base = randn(n, torch.float32, gen, device)
    weight = base + torch.sigmoid(logits) * delta
    grad = randn(n, torch.float32, gen, device)
    ops.mask_step_(logits, weight, grad, delta, None, lr=5.0, backend=backend)
    torch.testing.assert_close(weight, base + torch.sigmoid(logits) * delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_dtype", DTYPES)
def test_mask_grad_sumsq_matches_reference(backend_device, dtype, delta_dtype, gen):
    """A sum over up to 2^20 squares: summation order differs from torch.sum, so the tolerance is
    relative (fp32 sums of n terms: ~sqrt(n)·eps; 1e-5 holds with margin), for every dtype since
    the squares are formed in fp32 from exactly converted inputs."""
    backend, device = backend_device
    for n in sizes_for(backend_device):
        logits = _logits(n, gen, device)
        grad = randn(n, dtype, gen, device, scale=0.1)
        delta = randn(n, delta_dtype, gen, device, scale=0.5)
        want = reference.mask_grad_sumsq(logits, grad, delta)
        got = ops.mask_grad_sumsq(logits, grad, delta, backend=backend)
        assert got.shape == () and got.dtype == torch.float32 and got.device == logits.device
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0, msg=f"n={n}")


def test_mask_grad_sumsq_of_a_single_element_is_exact(any_backend):
    backend, device = any_backend
    s, g, d = (torch.tensor([v], device=device) for v in (0.0, 3.0, -2.0))
    got = ops.mask_grad_sumsq(s, g, d, backend=backend)
    assert float(got) == (3.0 * -2.0 * 0.25) ** 2  # σ'(0) = 1/4


def test_native_cpu_sums_are_the_same_for_every_thread_count(gen):
    """mask_grad_sumsq (and entropy_argmax) sum fixed chunks in a fixed order: CALM's normalized
    step does not change with torch.set_num_threads."""
    if not _extension.NATIVE:
        pytest.skip(f"native extension not built: {_extension.LOAD_ERROR}")
    n = 3 * 32768 * 7 + 5  # many chunks, a partial last one
    s, g, d = _logits(n, gen, "cpu"), torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.01
    logits = torch.randn(257, 1001, generator=gen) * 7
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((ops.mask_grad_sumsq(s, g, d, backend="native"),
                            ops.entropy_argmax(logits, backend="native")[0]))
    finally:
        torch.set_num_threads(threads)
    for sumsq, entropy in results[1:]:
        assert torch.equal(sumsq, results[0][0]) and torch.equal(entropy, results[0][1])


@pytest.mark.parametrize("mode", ["soft", "hard", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_dtype", DTYPES)
def test_masked_apply_matches_reference(backend_device, mode, dtype, delta_dtype, gen):
    backend, device = backend_device
    for n in sizes_for(backend_device):
        weight = randn(n, dtype, gen, device)
        delta = randn(n, delta_dtype, gen, device)
        logits = _logits(n, gen, device)
        mask = reference.pack_mask(logits) if mode == "packed" else logits
        want = weight.clone()
        reference.masked_apply_(want, delta, mask, mode)
        got = ops.masked_apply(weight, delta, mask, mode, backend=backend)
        torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=f"n={n}")


def test_masked_apply_keeps_shape_and_input(any_backend, gen):
    backend, device = any_backend
    weight = randn((3, 5, 7), torch.float32, gen, device)
    delta = randn((3, 5, 7), torch.float32, gen, device)
    mask = randn((3, 5, 7), torch.float32, gen, device)
    before = weight.clone()
    out = ops.masked_apply(weight, delta, mask, "hard", backend=backend)
    assert out.shape == weight.shape
    assert torch.equal(weight, before)
    torch.testing.assert_close(out, before + (mask > 0) * delta)
