"""Loads the compiled extension (calm_fast._C), which registers torch.ops.calm_fast.*."""
from __future__ import annotations

import torch

from . import _meta

try:
    from . import _C  # noqa: F401  (importing registers the ops with the dispatcher)
except ImportError as exc:  # not built: every op falls back to its plain-torch reference
    _C = None
    LOAD_ERROR: str | None = str(exc)
else:
    LOAD_ERROR = None
    _meta.register_fakes()

NATIVE = _C is not None
NATIVE_CUDA = NATIVE and bool(_C.with_cuda)


def native_op(name: str):
    return getattr(torch.ops.calm_fast, name)
