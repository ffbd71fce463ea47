"""entropy_argmax: softmax entropy and argmax per row in one read of the logits."""
import math

import pytest
import torch

from calm_fast import ops, reference
from conftest import DTYPES

SHAPES = [(0, 5), (1, 1), (7, 1), (5, 3), (33, 10), (4, 1000), (3, 4099)]
ENTROPY_TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 arithmetic whatever the input dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_entropy_argmax_matches_reference(backend_device, dtype, scale, gen):
    backend, device = backend_device
    for rows, cols in SHAPES:
        logits = (torch.randn(rows, cols, generator=gen) * scale).to(dtype).to(device)
        want_h, want_i = reference.entropy_argmax(logits)
        h, i = ops.entropy_argmax(logits, backend=backend)
        assert h.dtype == torch.float32 and i.dtype == torch.int64
        torch.testing.assert_close(h, want_h, **ENTROPY_TOL, msg=f"{rows}x{cols}")
        assert torch.equal(i, want_i), f"{rows}x{cols}"


def test_entropy_extremes(any_backend):
    backend, device = any_backend
    one_hot = torch.zeros(4, 1000)
    one_hot[torch.arange(4), torch.tensor([0, 999, 500, 3])] = 1e4
    uniform = torch.full((2, 1000), -7.5)
    single = torch.randn(3, 1)
    h, i = ops.entropy_argmax(one_hot.to(device), backend=backend)
    assert torch.all(h.abs() <= 1e-6) and i.tolist() == [0, 999, 500, 3]
    h, i = ops.entropy_argmax(uniform.to(device), backend=backend)
    torch.testing.assert_close(h.cpu(), torch.full((2,), math.log(1000)), atol=1e-4, rtol=1e-5)
    assert i.tolist() == [0, 0]  # the first of equal maxima
    h, i = ops.entropy_argmax(single.to(device), backend=backend)
    assert torch.all(h == 0) and torch.all(i == 0)


def test_nan_rows_propagate(any_backend):
    backend, device = any_backend
    logits = torch.randn(3, 9)
    logits[1, 4] = float("nan")
    h, i = ops.entropy_argmax(logits.to(device), backend=backend)
    assert torch.isnan(h[1]) and i[1] == 4
    assert torch.isfinite(h[[0, 2]]).all()
