"""Bad input gives a clear ValueError / TypeError naming the op, on every backend."""
import pytest
import torch

from calm_fast import ops
from conftest import backend_params

f32 = torch.float32


def _cases():
    x = torch.randn(10)
    s = torch.randn(10)
    packed = torch.zeros(2, dtype=torch.uint8)
    return {
        "mask_step int logits": (TypeError, "logits must be float32",
                                 lambda b: ops.mask_step_(x.long(), x.clone(), x, x, lr=1.0, backend=b)),
        "mask_step shape": (ValueError, "grad has shape",
                            lambda b: ops.mask_step_(s.clone(), x.clone(), torch.randn(9), x, lr=1.0, backend=b)),
        "mask_step grad dtype": (TypeError, "grad must have weight's dtype",
                                 lambda b: ops.mask_step_(s.clone(), x.clone(), x.half(), x, lr=1.0, backend=b)),
        "mask_step reg": (ValueError, "reg must be one of",
                          lambda b: ops.mask_step_(s.clone(), x.clone(), x, x, lr=1.0, reg="l2", backend=b)),
        "mask_step non-contiguous": (ValueError, "must be contiguous",
                                     lambda b: ops.mask_step_(torch.randn(10, 2)[:, 0], torch.randn(10), x, x,
                                                              lr=1.0, backend=b)),
        "mask_step device mix": (ValueError, "is on meta",
                                 lambda b: ops.mask_step_(s.clone(), x.clone(), x, x.to("meta"), lr=1.0,
                                                          backend=b)),
        "sumsq int logits": (TypeError, "logits must be float32",
                             lambda b: ops.mask_grad_sumsq(x.long(), x, x, backend=b)),
        "sumsq int grad": (TypeError, "grad must be float32",
                           lambda b: ops.mask_grad_sumsq(s, x.long(), x, backend=b)),
        "sumsq shape": (ValueError, "delta has shape",
                        lambda b: ops.mask_grad_sumsq(s, x, torch.randn(9), backend=b)),
        "sumsq non-contiguous": (ValueError, "grad must be contiguous",
                                 lambda b: ops.mask_grad_sumsq(s, torch.randn(10, 2)[:, 0], x, backend=b)),
        "masked_apply int weight": (TypeError, "weight must be float32",
                                    lambda b: ops.masked_apply_(x.int(), x, s, "hard", backend=b)),
        "masked_apply mode": (ValueError, "mode must be one of",
                              lambda b: ops.masked_apply_(x.clone(), x, s, "fuzzy", backend=b)),
        "masked_apply packed size": (ValueError, "packed mask for 10 scalars",
                                     lambda b: ops.masked_apply_(x.clone(), x, torch.zeros(1, dtype=torch.uint8),
                                                                 "packed", backend=b)),
        "masked_apply packed dtype": (TypeError, "packed mask must be uint8",
                                      lambda b: ops.masked_apply_(x.clone(), x, s, "packed", backend=b)),
        "consensus empty": (ValueError, "at least one task vector",
                            lambda b: ops.consensus_merge([], [], backend=b)),
        "consensus shapes": (ValueError, r"task_vectors\[1\] has shape",
                             lambda b: ops.consensus_merge([x, torch.randn(3)], [1, 1], backend=b)),
        "consensus dtypes": (TypeError, r"task_vectors\[1\] has dtype",
                             lambda b: ops.consensus_merge([x, x.half()], [1, 1], backend=b)),
        "consensus weights": (ValueError, "got 1 weights for 2",
                              lambda b: ops.consensus_merge([x, x], [1], backend=b)),
        "consensus thresholds": (ValueError, "needs one threshold per task",
                                 lambda b: ops.consensus_merge([x, x], [1, 1], [0.1], "ties", backend=b)),
        "consensus method": (ValueError, "method must be one of",
                             lambda b: ops.consensus_merge([x], [1], [0.1], "dare", backend=b)),
        "consensus votes": (ValueError, "min_votes must lie in",
                            lambda b: ops.consensus_merge([x], [1], [0.1], "consensus", 3, backend=b)),
        "threshold k too big": (ValueError, r"k must lie in \[0, 10\]",
                                lambda b: ops.magnitude_threshold([x], 11, backend=b)),
        "threshold k negative": (ValueError, "k must lie in",
                                 lambda b: ops.magnitude_threshold([x], -1, backend=b)),
        "threshold empty list": (ValueError, "at least one tensor",
                                 lambda b: ops.magnitude_threshold([], 0, backend=b)),
        "threshold dtypes": (TypeError, r"tensors\[1\] has dtype",
                             lambda b: ops.magnitude_threshold([x, x.half()], 1, backend=b)),
        "threshold ints": (TypeError, "must be float32",
                           lambda b: ops.magnitude_threshold([x.long()], 1, backend=b)),
        "entropy 1-D": (ValueError, r"shape \[B, C\]",
                        lambda b: ops.entropy_argmax(x, backend=b)),
        "entropy no classes": (ValueError, r"shape \[B, C\]",
                               lambda b: ops.entropy_argmax(torch.randn(3, 0), backend=b)),
        "entropy non-contiguous": (ValueError, "must be contiguous",
                                   lambda b: ops.entropy_argmax(torch.randn(4, 3).t(), backend=b)),
        "pack int": (TypeError, "mask must be bool or a float",
                     lambda b: ops.pack_mask(x.long(), backend=b)),
        "unpack size": (ValueError, "packed must have shape",
                        lambda b: ops.unpack_mask(packed, 30, backend=b)),
        "unpack dtype": (TypeError, "packed must be uint8",
                         lambda b: ops.unpack_mask(packed.float(), 16, backend=b)),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cpu_backend", backend_params((("native", "cpu"), ("triton", "cpu"), ("reference", "cpu"))))
def test_bad_input_raises_clear_error(cpu_backend, case):
    """On CPU tensors: the checks are the same code for every device."""
    backend, _ = cpu_backend
    exc, pattern, call = CASES[case]
    with pytest.raises(exc, match=pattern):
        call(backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.pack_mask(torch.ones(3), backend="cuda-graphs")
