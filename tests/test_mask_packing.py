"""pack_mask / unpack_mask: 1 bit per scalar, little-endian within each byte."""
import numpy as np
import pytest
import torch

from calm_fast import ops, reference
from conftest import sizes_for


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16, torch.float16])
def test_pack_matches_numpy_and_round_trips(any_backend, dtype, gen):
    backend, device = any_backend
    for n in sizes_for(any_backend):
        values = torch.randn(n, generator=gen)
        values[::11] = 0.0  # zero is not > 0
        mask = (values > 0) if dtype == torch.bool else values.to(dtype)
        truth = mask > 0  # of the typed mask: a tiny positive float32 value rounds to float16 zero
        packed = ops.pack_mask(mask.to(device), backend=backend)
        want = np.packbits(truth.numpy(), bitorder="little")
        assert packed.dtype == torch.uint8 and packed.shape == (len(want),)
        assert np.array_equal(packed.cpu().numpy(), want), f"n={n}"
        unpacked = ops.unpack_mask(packed, n, backend=backend)
        assert unpacked.dtype == torch.bool and unpacked.shape == (n,)
        # compare bytes, not truth values: an unwritten (poisoned) byte is not a valid bool
        assert torch.equal(unpacked.cpu().view(torch.uint8), truth.view(torch.uint8))


def test_pack_keeps_trailing_bits_zero(any_backend):
    backend, device = any_backend
    packed = ops.pack_mask(torch.ones(13, dtype=torch.bool, device=device), backend=backend)
    assert packed.cpu().tolist() == [255, 0b11111]


def test_reference_pack_matches_numpy(gen):
    bits = torch.rand(1001, generator=gen) > 0.5
    assert np.array_equal(reference.pack_mask(bits).numpy(), np.packbits(bits.numpy(), bitorder="little"))
