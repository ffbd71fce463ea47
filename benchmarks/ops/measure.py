"""One case of the op benchmark: every variant checked against eager on the same inputs (which
also warms it up or compiles it), then all of them timed, taking turns on the CPU."""
from __future__ import annotations

import math
import os
import statistics
import time
import traceback

import torch

from ..harness import Timer, sync
from . import eager
from .cases import Case, variant_impl


def clone_inputs(inp: dict) -> dict:
    out = {}
    for key, v in inp.items():
        if isinstance(v, torch.Tensor):
            out[key] = v.clone()
        elif isinstance(v, list):
            out[key] = [t.clone() for t in v]
        else:
            out[key] = v
    return out


def input_bytes(inp: dict) -> int:
    total = 0
    for v in inp.values():
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def compare(want: list, got: list, tol: dict) -> str:
    if len(want) != len(got):
        return f"FAIL: {len(got)} outputs, eager gave {len(want)}"
    bad_total, numel_total, worst = 0, 0, 0.0
    for w, g in zip(want, got):
        if not isinstance(g, torch.Tensor):
            return f"FAIL: output is {type(g).__name__}"
        g = g.reshape(-1)
        w = w.reshape(-1)
        if g.numel() != w.numel():
            return f"FAIL: {g.numel()} elements, eager {w.numel()}"
        if w.is_floating_point():
            gf, wf = g.double(), w.double()
            bad = ~torch.isclose(gf, wf, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True)
            if bad.any():
                worst = max(worst, float(((gf - wf).abs() / wf.abs().clamp(min=1e-30))[bad].max()))
        else:
            bad = g != w
        bad_total += int(bad.sum())
        numel_total += w.numel()
    if bad_total == 0:
        return "ok"
    frac = bad_total / max(numel_total, 1)
    if frac <= 1e-5:  # rounding-order ties (e.g. a TIES sign election on a ~0 sum)
        return f"ok ({bad_total} of {numel_total} differ)"
    return f"FAIL: {bad_total} of {numel_total} differ (worst rel {worst:.2e})"




def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def _check_variants(case: Case, variants, device, base_inp: dict, check: bool, n_sets: int) -> tuple[list, dict]:
    """Phase 1: build, check against eager, compile; base_inp stays pristine. The rows, and the
    implementations that ran."""
    want = None
    if check:
        inp = clone_inputs(base_inp) if case.mutates else base_inp
        want = [t.clone() for t in case.outputs(inp, case.call(getattr(eager, case.op), inp))]
        del inp
    rows, impls = [], {}
    for variant in variants:
        if variant == "triton" and device.type != "cuda":
            continue
        row = dict(op=case.op, case=case.label, variant=variant, size=case.size, shape=case.shape,
                   dtype=case.dtype, bytes=case.nbytes, median_ms=None, gbps=None, frac_copy=None,
                   speedup_vs_eager=None, reps=0, sets=n_sets, check=None)
        rows.append(row)
        try:
            impl = variant_impl(case, variant)
            t0 = time.perf_counter()
            inp = clone_inputs(base_inp) if case.mutates else base_inp
            got = case.outputs(inp, case.call(impl, inp))
            sync(device)
            if variant == "compile":
                row["compile_s"] = round(time.perf_counter() - t0, 2)
            if check:
                row["check"] = "ok" if variant == "eager" else compare(want, got, case.tol)
            del inp, got
            impls[variant] = impl
        except Exception as exc:  # noqa: BLE001  (a missing kernel must not stop the run)
            row["error"] = _error(exc)
            if os.environ.get("CALM_FAST_BENCH_TRACEBACK"):
                traceback.print_exc()
    return rows, impls


def bench_case(case: Case, variants, device, timer: Timer, cache_bytes: int, gen, check: bool,
               copy_gbps: float, log) -> list[dict]:
    """Check every variant against eager (this also warms up / compiles), then time them all.
    When one input set would fit in the last-level cache, the calls rotate among several."""
    base_inp = case.make(gen)
    set_bytes = input_bytes(base_inp)
    n_sets = 1 if set_bytes >= 4 * cache_bytes else min(8, math.ceil(4 * cache_bytes / max(set_bytes, 1)))
    rows, impls = _check_variants(case, variants, device, base_inp, check, n_sets)
    sets = [base_inp] + [case.make(gen) for _ in range(n_sets - 1)]
    fns = {v: [lambda impl=impl, s=s: case.call(impl, s) for s in sets] for v, impl in impls.items()}
    # phase 2: time. On CPU the variants take turns call by call, so that load from other
    # processes hits them alike.
    times, errors = timer.interleaved(fns)
    eager_t = times.get("eager")
    eager_ms = statistics.median(eager_t) if eager_t else None
    for row in rows:
        t = times.get(row["variant"])
        if row["variant"] in errors:
            row["error"] = _error(errors[row["variant"]])
        elif t:
            med = statistics.median(t)
            row.update(median_ms=round(med, 4), min_ms=round(min(t), 4), reps=len(t))
            row["gbps"] = round(case.nbytes / (med * 1e-3) / 1e9, 2)
            row["frac_copy"] = round(row["gbps"] / copy_gbps, 3)
            if eager_ms is not None:
                row["speedup_vs_eager"] = round(eager_ms / med, 2)
        log(row)
    del sets, base_inp
    return rows
