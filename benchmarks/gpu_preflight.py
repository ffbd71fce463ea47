"""The GPU run's preflight (benchmarks/gpu_run.sh): seconds of checks that stop the run, loudly,
before it spends lent minutes on a setup that cannot measure what it is for.

    python -m benchmarks.gpu_preflight [--device cuda|cpu]

Fails (exit 1, one line per problem) when: no device of that type is visible; the native
extension did not load or, for CUDA, has no CUDA kernels; the Triton kernels do not import from
this tree (an installed calm_fast maps them from kernels/triton, a source tree must too);
the default backend would not be native; or an op on either backend raises, warns about a
fallback, or differs from the plain-torch reference. `--device cpu` (with TRITON_INTERPRET=1)
runs the same checks on a machine without a GPU: CI does, from a copy of the source tree.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def problems(device: torch.device) -> list[str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["no CUDA device visible (torch.cuda.is_available() is False)"]
    import calm_fast
    from calm_fast import _extension, ops, reference

    found = []
    if not _extension.NATIVE:
        found.append(f"native extension not loaded: {_extension.LOAD_ERROR}")
    elif device.type == "cuda" and not _extension.NATIVE_CUDA:
        found.append("native extension built without CUDA kernels (was nvcc found at build time?)")
    try:
        kernels = ops._triton_module()
    except Exception as exc:  # noqa: BLE001  (any import failure is the finding)
        return found + [f"Triton kernels do not import: {type(exc).__name__}: {exc}"]
    if ops.resolve_backend(device) != "native":
        found.append(f"default backend on {device.type} is {ops.resolve_backend(device)!r}, not 'native'")
    print(f"calm_fast {calm_fast.__file__}, triton kernels {kernels.__file__}, native cpu isa {_extension.CPU_ISA}")

    gen = torch.Generator().manual_seed(0)
    n = 4099  # not a multiple of any block
    x = torch.randn(n, generator=gen)
    chunks = [torch.randn(m, generator=gen) for m in (1000, 3, n)]
    for backend in ("native", "triton"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback warning is a failure here
                got = ops.masked_apply(x.to(device), x.to(device), x.to(device), "soft", backend=backend)
                threshold, quota = ops.magnitude_threshold([c.to(device) for c in chunks], 777, backend=backend)
            want = x.clone()
            reference.masked_apply_(want, x, x, "soft")
            want_threshold, want_quota = reference.magnitude_threshold(chunks, 777)
            torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
            assert threshold.item() == want_threshold.item() and quota.cpu().tolist() == want_quota.tolist(), \
                "magnitude_threshold differs from the reference"
        except Exception as exc:  # noqa: BLE001
            found.append(f"{backend} on {device.type}: {type(exc).__name__}: {exc}")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = torch.device(ap.parse_args(argv).device)
    found = problems(device)
    for p in found:
        print(f"PREFLIGHT FAILED: {p}", flush=True)
    if not found:
        print(f"preflight passed on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
