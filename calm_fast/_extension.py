"""Loads the compiled modules: calm_fast._C (op schemas, CUDA kernels) and one CPU kernel module
calm_fast._C_cpu_<isa>, the best of csrc/cpu/ISAS that this CPU runs. Importing them registers
torch.ops.calm_fast.*; without them every op falls back to its plain-torch reference."""
from __future__ import annotations

import importlib
import os

import torch

from . import _meta

# Best first. ATen's capability names -> ours; every other capability runs the `default` build.
CPU_ISAS = ("avx512", "avx2", "default")
_FROM_ATEN = {"AVX512": "avx512", "AVX2": "avx2"}


def best_cpu_isa() -> str:
    """The widest ISA this CPU runs, as ATen sees it (ATEN_CPU_CAPABILITY can lower it)."""
    return _FROM_ATEN.get(torch.backends.cpu.get_cpu_capability(), "default")


def _load_cpu_kernels():
    """Imports one CPU module: $CALM_FAST_CPU_ISA if set (for tests and benchmarks), else the best
    that is built and that this CPU runs. Importing two would register each kernel twice."""
    best = CPU_ISAS.index(best_cpu_isa())
    forced = os.environ.get("CALM_FAST_CPU_ISA")
    if forced:
        if forced not in CPU_ISAS:
            raise ImportError(f"CALM_FAST_CPU_ISA={forced!r}: expected one of {CPU_ISAS}")
        if CPU_ISAS.index(forced) < best:
            raise ImportError(f"CALM_FAST_CPU_ISA={forced!r}: this CPU runs at most {CPU_ISAS[best]!r}")
        candidates = (forced,)
    else:
        candidates = CPU_ISAS[best:]
    for isa in candidates:
        try:
            return importlib.import_module(f"{__package__}._C_cpu_{isa}")
        except ModuleNotFoundError:
            continue
    raise ImportError(f"no CPU kernel module among {', '.join(f'_C_cpu_{i}' for i in candidates)} is built")


try:
    from . import _C  # noqa: F401  (importing registers the schemas and the CUDA kernels)
    cpu_kernels = _load_cpu_kernels()
except ImportError as exc:
    _C = cpu_kernels = None
    LOAD_ERROR: str | None = str(exc)
else:
    LOAD_ERROR = None
    _meta.register_fakes()

NATIVE = _C is not None
NATIVE_CUDA = NATIVE and bool(_C.with_cuda)
CPU_ISA: str | None = cpu_kernels.isa if NATIVE else None  # the CPU kernel build in use


def native_op(name: str):
    return getattr(torch.ops.calm_fast, name)
