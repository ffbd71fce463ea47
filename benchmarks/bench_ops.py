#!/usr/bin/env python
"""Microbenchmarks of the calm_fast ops: eager PyTorch vs torch.compile vs native vs Triton.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--sizes 16M ...] [--quick]
                                   [--ops mask_step_ ...] [--variants eager native ...]
                                   [--out benchmarks/results]

Per op and size it times
  eager    the research-code composition in benchmarks/eager.py (separate kernels, temporaries)
  compile  torch.compile(eager fn) (default mode; compile time excluded: first call is warm-up)
  native   calm_fast op, backend="native" (torch.ops.calm_fast.*, C++/OpenMP or CUDA)
  triton   calm_fast op, backend="triton" (CUDA tensors only)
and reports the median time, GB/s under each op's minimal-traffic byte model (BYTE MODELS below),
that bandwidth as a fraction of a device copy measured in the same run, and the speedup over
eager measured in the same run. Before timing, every variant's output is checked against eager's
on the same inputs (column `check`).

Timing. CPU: time.perf_counter around each call after warm-up, median of >= 7 calls (more while
the per-row time budget lasts). GPU: CUDA events around each call after warm-up, a 256 MiB L2
flush before each call, median of >= 10 calls. When one input set would fit in the last-level
cache, several input sets are allocated and the calls rotate among them.

BYTE MODELS (bytes read + written per call, each input read once, each output written once;
es = element size of the op's tensors; N = elements):
  mask_step_      base=None: read S (4), theta, g, delta; write S (4), theta: N*(8 + 4*es)
                  (fp32: 24 B/elem, bf16 weights/grad/delta: 16 B/elem)
  mask_grad_sumsq read S (4), g, delta; write one scalar: N*(4 + 2*es)  (fp32: 12 B, bf16: 8 B)
  masked_apply_   hard: read theta, delta, S (4); write theta: N*(3*es + 4)  (fp32: 16 B)
                  packed: read theta, delta, N/8 mask bytes; write theta: N*3*es + N/8 (12.125 B)
  consensus_merge read T task vectors, write 1 merged: (T+1)*N*es  (T=8 fp32: 36 B/elem)
  magnitude_threshold  read every |x| once: N*es (radix passes that re-read are the kernel's cost)
  entropy_argmax  read B*C logits, write B fp32 entropies + B int64 indices: B*C*es + 12*B
  pack_mask       read N mask values, write ceil(N/8) bytes: N*es_in + ceil(N/8)
  unpack_mask     read ceil(N/8) bytes, write N bools: ceil(N/8) + N
Copy bandwidth: CPU dst.copy_(src) of 256 MiB fp32; GPU device-to-device copy of 1 GiB; counted as
bytes read + bytes written, measured at the start and at the end of the run; the larger is used.

Targets (printed, not asserted): GPU streaming ops (all but magnitude_threshold) >= 85 % of copy
bandwidth and >= 3x eager; magnitude_threshold >= 5x torch.topk over the concatenated |x|
(= its eager column); CPU native ops >= 2x eager (evaluated at the largest size of each case).

Outputs: <out>/ops_<device-slug>.json (rows + metadata) and <out>/ops_<device-slug>.md.
--quick shrinks every size (CI smoke test; runs in seconds) and, unless --out is given, writes to
benchmarks/results/quick/ so that it never overwrites a full run's results.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import eager  # noqa: E402  (benchmarks/eager.py)

try:
    import calm_fast  # noqa: E402
except ImportError:  # not installed: use the checkout (falls back to the reference without _C)
    sys.path.insert(0, str(ROOT))
    import calm_fast  # noqa: E402,F401
from machine import command_output, cpu_model  # noqa: E402  (benchmarks/machine.py)
from calm_fast import _extension, _meta, ops as cf_ops, reference  # noqa: E402

MiB = 1 << 20
LOADAVG: list[float] = []  # 1-minute load average at the start and at the end of the run
OPS = _meta.OPS
VARIANTS = ("eager", "compile", "native", "triton")
VIT_L14_VISUAL = 303_966_208  # CLIP ViT-L/14 visual tower parameters

# ---------------------------------------------------------------------------------------------
# sizes


def parse_count(text: str) -> int:
    """'16M' -> 16 * 2**20, '1e6' -> 1000000, '303966208' -> 303966208 (K/M/G are binary)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgG]?)i?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not an element count: {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\w+)\s*[xX*,]\s*(\w+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a BxC shape: {text!r}")
    return parse_count(m.group(1)), parse_count(m.group(2))


def human(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % (scale // 16) == 0:
            v = n / scale
            return f"{v:g}{unit}"
    return f"{n:,}"


def vit_like_shapes(total: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a CLIP-ViT-like visual tower (24 blocks, 294 tensors) summing to `total`.

    total == 303,966,208 gives exactly ViT-L/14's visual tower (width 1024, patch 14, proj 768).
    Otherwise the width is scaled down and the last tensor (proj) absorbs the remainder.
    """
    def shapes(d: int, proj: int | None) -> list[tuple[int, ...]]:
        h = 4 * d
        out = [(d, 3, 14, 14), (d,), (257, d), (d,), (d,)]
        for _ in range(24):
            out += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (h, d), (h,), (d, h), (d,)]
        out += [(d,), (d,)]
        if proj is not None:
            out.append((proj,))
        return out

    def count(shs):
        return sum(math.prod(s) for s in shs)

    if total == VIT_L14_VISUAL:
        return shapes(1024, None) + [(1024, 768)]
    best = None
    d = 8
    while count(shapes(d, None)) + 1 <= total:
        best = d
        d += 8
    if best is None:  # too small for even width 8: split evenly into up to 294 pieces
        pieces = max(1, min(294, total))
        base, extra = divmod(total, pieces)
        return [(base + (1 if i < extra else 0),) for i in range(pieces)]
    body = shapes(best, None)
    return body + [(total - count(body),)]


# ---------------------------------------------------------------------------------------------
# benchmark cases


@dataclass
class Case:
    op: str
    label: str                       # what distinguishes cases of one op (dtype, mode, method)
    dtype: str
    size: int                        # elements (per task for consensus; B*C for entropy)
    shape: str
    nbytes: int                      # minimal traffic per call (see BYTE MODELS)
    make: Callable                   # (generator) -> dict of inputs
    call: Callable                   # (impl, inputs) -> result
    outputs: Callable                # (inputs, result) -> list of tensors to compare
    mutates: bool = False
    tol: dict = field(default_factory=lambda: dict(rtol=1e-4, atol=1e-6))
    impls: dict = field(default_factory=dict)


def _randn(n, gen, device, scale=1.0, dtype=torch.float32):
    t = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def _es(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def build_cases(args, device) -> list[Case]:
    cases = []
    dev = device
    T = args.tasks
    for n in args.sizes:
        if "mask_step_" in args.ops:
            for dt in (torch.float32, torch.bfloat16):
                def make(gen, n=n, dt=dt):
                    return dict(S=_randn(n, gen, dev, 3.0), W=_randn(n, gen, dev, 0.02, dt),
                                G=_randn(n, gen, dev, 1e-3, dt), D=_randn(n, gen, dev, 1e-3, dt))
                cases.append(Case(
                    "mask_step_", "bf16" if dt == torch.bfloat16 else "fp32", str(dt).split(".")[-1],
                    n, f"({human(n)},)", n * (8 + 4 * _es(dt)), make,
                    lambda f, i: f(i["S"], i["W"], i["G"], i["D"], None, lr=1e4, l1=1.0, reg="polarize"),
                    lambda i, r: [i["S"], i["W"]], mutates=True,
                    tol=dict(rtol=2e-2, atol=1e-5) if dt == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)))
        if "mask_grad_sumsq" in args.ops:
            for dt in (torch.float32, torch.bfloat16):
                def make(gen, n=n, dt=dt):
                    return dict(S=_randn(n, gen, dev, 3.0), G=_randn(n, gen, dev, 1e-3, dt),
                                D=_randn(n, gen, dev, 1e-3, dt))
                cases.append(Case(
                    "mask_grad_sumsq", "bf16" if dt == torch.bfloat16 else "fp32", str(dt).split(".")[-1],
                    n, f"({human(n)},)", n * (4 + 2 * _es(dt)), make,
                    lambda f, i: f(i["S"], i["G"], i["D"]), lambda i, r: [r], tol=dict(rtol=1e-4, atol=0)))
        if "masked_apply_" in args.ops:
            for mode in ("hard", "packed"):
                def make(gen, n=n, mode=mode):
                    s = _randn(n, gen, dev)
                    m = s if mode == "hard" else reference.pack_mask(s)
                    return dict(W=_randn(n, gen, dev, 0.02), D=_randn(n, gen, dev, 1e-3), M=m)
                nb = n * 16 if mode == "hard" else n * 12 + (n + 7) // 8
                cases.append(Case(
                    "masked_apply_", mode, "float32", n, f"({human(n)},)", nb, make,
                    lambda f, i, mode=mode: f(i["W"], i["D"], i["M"], mode),
                    lambda i, r: [i["W"]], mutates=True))
        if "pack_mask" in args.ops:
            for dt in (torch.float32, torch.bool):
                def make(gen, n=n, dt=dt):
                    s = _randn(n, gen, dev)
                    return dict(M=s if dt == torch.float32 else s > 0)
                cases.append(Case(
                    "pack_mask", "bool" if dt == torch.bool else "fp32", str(dt).split(".")[-1], n,
                    f"({human(n)},)", n * _es(dt) + (n + 7) // 8, make,
                    lambda f, i: f(i["M"]), lambda i, r: [r], tol=dict(rtol=0, atol=0)))
        if "unpack_mask" in args.ops:
            def make(gen, n=n):
                return dict(P=reference.pack_mask(_randn(n, gen, dev)), n=n)
            cases.append(Case(
                "unpack_mask", "bool", "uint8", n, f"({human((n + 7) // 8)},) bytes", (n + 7) // 8 + n, make,
                lambda f, i: f(i["P"], i["n"]), lambda i, r: [r], tol=dict(rtol=0, atol=0)))
    if "consensus_merge" in args.ops:
        for n in args.consensus_sizes:
            for method in ("sum", "ties", "consensus"):
                def make(gen, n=n):
                    return dict(taus=[_randn(n, gen, dev, 1e-3 * (1 + 0.1 * t)) for t in range(T)])
                weights = [0.3] * T
                if method == "ties":  # keep ~top 20 % of each task vector (|x| >= 1.2816 sigma)
                    thresholds = [1.2816e-3 * (1 + 0.1 * t) for t in range(T)]
                elif method == "consensus":  # TALL masks, lambda_t = 0.4, k = 2 votes
                    thresholds = [0.4] * T
                else:
                    thresholds = []
                votes = 2 if method == "consensus" else 0
                cases.append(Case(
                    "consensus_merge", f"{method} T={T}", "float32", n, f"{T} x ({human(n)},)",
                    (T + 1) * n * 4, make,
                    lambda f, i, w=weights, th=thresholds, m=method, v=votes: f(i["taus"], w, th, m, v),
                    lambda i, r: [r], tol=dict(rtol=1e-4, atol=1e-8)))
    if "magnitude_threshold" in args.ops:
        for n in args.threshold_sizes:
            shapes = vit_like_shapes(n)
            k = max(1, int(1e-5 * n))

            def make(gen, shapes=shapes):
                out = []
                for j, s in enumerate(shapes):
                    scale = 10.0 ** (-4.0 + 1.5 * ((j * 0.618034) % 1.0))  # per-tensor 1e-4..3e-3
                    out.append(_randn(math.prod(s), gen, dev, scale).reshape(s))
                return dict(tensors=out)
            cases.append(Case(
                "magnitude_threshold", f"k={k}", "float32", n, f"{len(shapes)} tensors",
                n * 4, make, lambda f, i, k=k: f(i["tensors"], k),
                lambda i, r: [r[0] if isinstance(r, (tuple, list)) else r], tol=dict(rtol=0, atol=0)))
    if "entropy_argmax" in args.ops:
        for b, c in args.entropy_shapes:
            def make(gen, b=b, c=c):
                return dict(Z=_randn(b * c, gen, dev, 3.0).reshape(b, c))
            cases.append(Case(
                "entropy_argmax", f"C={c}", "float32", b * c, f"({b}, {c})", b * c * 4 + 12 * b, make,
                lambda f, i: f(i["Z"]), lambda i, r: list(r), tol=dict(rtol=1e-4, atol=1e-4)))
    order = {op: j for j, op in enumerate(OPS)}
    cases.sort(key=lambda c: (order[c.op], c.size))
    return cases


def variant_impl(case: Case, variant: str):
    if variant == "eager":
        return getattr(eager, case.op)
    if variant == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile-limit surprises
        return torch.compile(getattr(eager, case.op), dynamic=False)
    backend = variant
    fn = getattr(cf_ops, case.op)

    def run(*a, **kw):
        return fn(*a, backend=backend, **kw)
    return run


# ---------------------------------------------------------------------------------------------
# timing


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device, quick: bool):
        self.device = device
        self.quick = quick
        if device.type == "cuda":
            self.flush = torch.empty(256 * MiB // 4, dtype=torch.float32, device=device)
            self.min_reps, self.max_reps, self.budget, self.warmup = 10, 200, 0.5 if quick else 1.0, 3
        else:
            self.flush = None
            self.min_reps, self.max_reps = 7, 50
            self.budget, self.warmup = (0.05, 1) if quick else (1.5, 2)

    def __call__(self, fns: list[Callable]) -> list[float]:
        """Per-call times in ms (after warm-up), calls rotating among fns."""
        for j in range(self.warmup):
            fns[j % len(fns)]()
        sync(self.device)
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            fns[0]()
            sync(self.device)
            est = max(time.perf_counter() - t0, 1e-6)
            reps = int(min(self.max_reps, max(self.min_reps, self.budget / est)))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for j in range(reps):
                self.flush.zero_()
                starts[j].record()
                fns[j % len(fns)]()
                ends[j].record()
            sync(self.device)
            return [s.elapsed_time(e) for s, e in zip(starts, ends)]
        times = []
        start = time.perf_counter()
        j = 0
        while len(times) < self.min_reps or (
                time.perf_counter() - start < self.budget and len(times) < self.max_reps):
            f = fns[j % len(fns)]
            j += 1
            t0 = time.perf_counter()
            f()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


    def interleaved(self, fns: dict[str, list[Callable]]) -> tuple[dict, dict]:
        """Per-call times in ms of several variants. GPU: one after the other (events). CPU:
        after each variant's warm-up, rounds of one call per variant until >= min_reps rounds
        and the time budget (per variant) is spent."""
        times, errors = {}, {}
        if self.device.type == "cuda":
            for name, f in fns.items():
                try:
                    times[name] = self(f)
                except Exception as exc:  # noqa: BLE001
                    errors[name] = exc
            return times, errors
        for name, f in list(fns.items()):
            try:
                for j in range(self.warmup):
                    f[j % len(f)]()
            except Exception as exc:  # noqa: BLE001
                errors[name] = exc
                del fns[name]
        times = {name: [] for name in fns}
        start = time.perf_counter()
        rounds = 0
        while rounds < self.min_reps or (time.perf_counter() - start < self.budget * len(fns)
                                         and rounds < self.max_reps):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f[rounds % len(f)]()
                times[name].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        return times, errors


def copy_bandwidth(device, timer: Timer) -> float:
    """GB/s of a large dst.copy_(src), counting bytes read + bytes written."""
    nbytes = (1024 if device.type == "cuda" else 256) * MiB
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = timer([lambda: dst.copy_(src)])
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def last_level_cache_bytes(device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * MiB) or 50 * MiB)
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
            best = max(best, parse_count(size.rstrip("B")))
        except (OSError, argparse.ArgumentTypeError):
            pass
    return best or 32 * MiB


# ---------------------------------------------------------------------------------------------
# correctness check of each variant against eager on the same inputs


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


# ---------------------------------------------------------------------------------------------
# metadata

def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(device) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    if device.type == "cuda":
        return f"cuda-{name}"
    return f"cpu-{name}-{len(os.sched_getaffinity(0))}c"

def metadata(args, device, copy_gbps: list[float]) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "native_threads": (_extension.cpu_kernels.num_threads() if _extension.NATIVE else None),
        "native_cpu_isa": _extension.CPU_ISA,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "numpy": version("numpy"),
        "native": _extension.NATIVE,
        "native_cuda": _extension.NATIVE_CUDA,
        "native_load_error": _extension.LOAD_ERROR,
        "copy_gbps_start_end": [round(x, 2) for x in copy_gbps],
        "copy_gbps": round(max(copy_gbps), 2),
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "python_executable": sys.executable,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(command_output(["git", "status", "--porcelain", "--", "csrc", "kernels", "calm_fast"])),
        "quick": args.quick,
        "variants": list(args.variants),
        "loadavg_start_end": [round(x, 2) for x in LOADAVG],
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        meta["cuda_runtime"] = torch.version.cuda
        smi = command_output(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader", f"--id={device.index or 0}"])
        meta["nvidia_smi"] = smi
        meta["cuda_driver"] = smi.split(",")[0].strip() if smi else None
        if meta["cuda_driver"] is None:
            try:
                v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
                meta["cuda_driver"] = v
            except Exception:  # noqa: BLE001
                pass
    return meta


# ---------------------------------------------------------------------------------------------
# main loop


def bench_case(case: Case, variants, device, timer: Timer, cache_bytes: int, gen, check: bool,
               copy_gbps: float, log) -> list[dict]:
    """Check every variant against eager (this also warms up / compiles), then time them all."""
    base_inp = case.make(gen)
    set_bytes = input_bytes(base_inp)
    n_sets = 1 if set_bytes >= 4 * cache_bytes else min(8, math.ceil(4 * cache_bytes / max(set_bytes, 1)))
    want = None
    if check:
        inp = clone_inputs(base_inp) if case.mutates else base_inp
        want = [t.clone() for t in case.outputs(inp, case.call(getattr(eager, case.op), inp))]
        del inp
    rows, impls = [], {}
    for variant in variants:  # phase 1: build, check, compile; base_inp stays pristine
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
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            if os.environ.get("CALM_FAST_BENCH_TRACEBACK"):
                traceback.print_exc()
    del want
    sets = [base_inp] + [case.make(gen) for _ in range(n_sets - 1)]
    live = [r for r in rows if r["variant"] in impls]
    fns = {r["variant"]: [lambda impl=impls[r["variant"]], s=s: case.call(impl, s) for s in sets]
           for r in live}
    # phase 2: time. On CPU the variants take turns call by call, so that load from other
    # processes hits them alike.
    times, errors = timer.interleaved(fns)
    eager_t = times.get("eager")
    eager_ms = statistics.median(eager_t) if eager_t else None
    for row in rows:
        t = times.get(row["variant"])
        if row["variant"] in errors:
            exc = errors[row["variant"]]
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
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


def fmt_row(r: dict) -> str:
    if r.get("error"):
        return f"{r['op']:<20} {r['case']:<16} {r['variant']:<8} {human(r['size']):>8}  ERROR {r['error']}"
    sp = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else "-"
    return (f"{r['op']:<20} {r['case']:<16} {r['variant']:<8} {human(r['size']):>8} "
            f"{r['median_ms']:>10.3f} ms {r['gbps']:>8.1f} GB/s {100 * r['frac_copy']:>6.1f}% "
            f"{sp:>8}  {r['check'] or ''}")


def evaluate_targets(rows: list[dict], device) -> list[dict]:
    """Targets at the largest size of each (op, case)."""
    largest = {}
    for r in rows:
        key = (r["op"], r["case"])
        largest[key] = max(largest.get(key, 0), r["size"])
    out = []
    for r in rows:
        if r["size"] != largest[(r["op"], r["case"])] or r["variant"] not in ("native", "triton"):
            continue
        name = f"{r['op']} {r['case']} {r['variant']} @{human(r['size'])}"
        ok_run = r.get("median_ms") is not None
        sp = r.get("speedup_vs_eager") or 0.0
        fc = r.get("frac_copy") or 0.0
        if r["op"] == "magnitude_threshold":
            goal, met = ">= 5x torch.topk(cat)", ok_run and sp >= 5
            got = f"{sp:.2f}x"
        elif device.type == "cuda":
            goal, met = ">= 85% copy BW and >= 3x eager", ok_run and fc >= 0.85 and sp >= 3
            got = f"{100 * fc:.1f}%, {sp:.2f}x"
        else:
            goal, met = ">= 2x eager", ok_run and sp >= 2
            got = f"{sp:.2f}x"
        if not ok_run:
            got = "error"
        out.append(dict(target=name, goal=goal, got=got, met=bool(met)))
    return out


def slow_native(rows: list[dict]) -> list[str]:
    """Native/triton rows slower than eager or compile of the same case and size."""
    notes = []
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["case"], r["size"]), {})[r["variant"]] = r
    for (op, case, size), vs in by_key.items():
        for v in ("native", "triton"):
            r = vs.get(v)
            if not r or r.get("median_ms") is None:
                continue
            for other in ("eager", "compile"):
                o = vs.get(other)
                if o and o.get("median_ms") is not None and o["median_ms"] < r["median_ms"]:
                    notes.append(f"{op} {case} @{human(size)}: {v} {r['median_ms']:.3f} ms is slower "
                                 f"than {other} {o['median_ms']:.3f} ms")
    return notes


def write_markdown(path: Path, meta: dict, rows: list[dict], targets: list[dict], notes: list[str]):
    lines = [f"# calm_fast op benchmarks: {meta['device']}", ""]
    keys = ["device", "cores", "torch_threads", "native_threads", "native_cpu_isa", "cpu_capability", "torch", "triton",
            "numpy", "python", "cuda_runtime", "cuda_driver", "copy_gbps", "copy_gbps_start_end",
            "loadavg_start_end", "git", "git_dirty", "date", "quick"]
    lines.append("; ".join(f"{k}: {meta[k]}" for k in keys if k in meta))
    if meta.get("partial"):
        lines += ["", "**Partial**: the run stopped before its last case; these are the cases it finished."]
    if meta["device_type"] == "cpu" and max(meta["loadavg_start_end"]) > 0.5 * meta["cores"]:
        lines += ["", f"**Noisy run**: 1-minute load average {meta['loadavg_start_end']} on {meta['cores']} "
                      "cores (other processes competed for the CPU). Variants were timed call by call "
                      "in turn, so ratios are fairer than absolute times; min ms is the least disturbed."]
    lines += ["", f"Command: `{meta['command']}`", "",
              "GB/s counts each op's minimal traffic (byte models in benchmarks/bench_ops.py); "
              "% copy = GB/s over the copy bandwidth measured in this run; x eager = speedup "
              "over benchmarks/eager.py in this run; check = output vs eager on the same inputs.", "",
              "| op | case | size | variant | median ms | min ms | GB/s | % copy | x eager | check |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['op']} | {r['case']} | {r['shape']} | {r['variant']} | error | | | | | "
                         f"{r['error'][:80].replace('|', '/')} |")
            continue
        sp = f"{r['speedup_vs_eager']:.2f}" if r["speedup_vs_eager"] is not None else ""
        lines.append(f"| {r['op']} | {r['case']} | {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | "
                     f"{r['min_ms']:.3f} | "
                     f"{r['gbps']:.1f} | {100 * r['frac_copy']:.1f} | {sp} | {r['check'] or ''} |")
    met = sum(t["met"] for t in targets)
    lines += ["", f"Targets: {met}/{len(targets)} met", ""]
    for t in targets:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['goal']} (got {t['got']})")
    if notes:
        lines += ["", "Kernels slower than eager or compile:", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--sizes", nargs="+", type=parse_count,
                   help="elements of the element-wise ops (default CPU 16M, GPU 256M; K/M/G binary)")
    p.add_argument("--consensus-sizes", nargs="+", type=parse_count,
                   help="elements per task vector (default: --sizes / 4 on CPU, / 8 on GPU)")
    p.add_argument("--threshold-sizes", nargs="+", type=parse_count,
                   help="total elements of the tensor list (default CPU 16M, GPU 303966208; "
                        "with --sizes: those)")
    p.add_argument("--entropy-shapes", nargs="+", type=parse_shape,
                   help="BxC logits (default CPU 16384x1000, GPU 65536x1000; with --sizes: size/1000 x 1000)")
    p.add_argument("--tasks", type=int, default=8, help="task vectors of consensus_merge")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="default: all (--quick: all but compile, whose first call costs ~20 s here)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, short timing, 1 CPU thread unless --threads: runs in seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads, which the native CPU kernels follow too)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking each variant's output against eager")
    p.add_argument("--strict", action="store_true", help="exit 1 if a check fails or a variant errors")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results, "
                                               "benchmarks/results/quick with --quick)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    explicit_sizes = args.sizes is not None
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (args.quick and v == "compile")]
    if args.quick:
        args.sizes = args.sizes or [256 << 10]
        args.consensus_sizes = args.consensus_sizes or [64 << 10]
        args.threshold_sizes = args.threshold_sizes or [256 << 10]
        args.entropy_shapes = args.entropy_shapes or [(256, 1000)]
        explicit_sizes = True
    if not args.sizes:
        args.sizes = [(256 if gpu else 16) << 20]
    if not args.consensus_sizes:
        args.consensus_sizes = [max(1, s // (8 if gpu else 4)) for s in args.sizes]
    if not args.threshold_sizes:
        args.threshold_sizes = list(args.sizes) if explicit_sizes else [VIT_L14_VISUAL if gpu else 16 << 20]
    if not args.entropy_shapes:
        args.entropy_shapes = ([(max(1, s // 1000), 1000) for s in args.sizes] if explicit_sizes
                               else [((65536 if gpu else 16384), 1000)])
    if args.threads is None and args.quick and not gpu:
        args.threads = 1  # a smoke test: a single thread shrugs off other processes' load
    if args.out is None:
        args.out = str(HERE / "results" / "quick") if args.quick else str(HERE / "results")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    timer = Timer(device, args.quick)
    cache = last_level_cache_bytes(device)
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run
    gen = torch.Generator(device=device).manual_seed(seed)

    print(f"calm_fast op benchmarks on {device_name(device)} ({device}); torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, native={_extension.NATIVE} "
          f"native_cuda={_extension.NATIVE_CUDA}", flush=True)
    LOADAVG.append(os.getloadavg()[0])
    if device.type == "cpu" and LOADAVG[0] > 0.5 * len(os.sched_getaffinity(0)):
        print(f"WARNING: load average {LOADAVG[0]:.2f} on {len(os.sched_getaffinity(0))} cores: other "
              "processes compete for the CPU and the timings will be noisy", flush=True)
    copy_gbps = [copy_bandwidth(device, timer)]
    print(f"copy bandwidth (read+write): {copy_gbps[0]:.1f} GB/s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and out == HERE / "results" / "quick":
        (out / ".gitignore").write_text("*\n")
    stem = f"ops_{slug(device)}"

    def save(rows, partial: bool):
        """JSON + markdown, rewritten after every case: a run cut short (a lent GPU's time limit)
        still leaves what it measured, marked partial."""
        ceiling = max(copy_gbps)
        for r in rows:  # fractions against the best copy measurement so far
            if r.get("gbps") is not None:
                r["frac_copy"] = round(r["gbps"] / ceiling, 3)
        targets, notes = evaluate_targets(rows, device), slow_native(rows)
        meta = metadata(args, device, copy_gbps)
        meta.update(wall_s=round(time.perf_counter() - t_start, 1), seed=seed, partial=partial)
        payload = dict(metadata=meta, rows=rows, targets=targets, slower_than_baseline=notes)
        tmp = out / f"{stem}.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(out / f"{stem}.json")
        tmp = out / f"{stem}.md.tmp"
        write_markdown(tmp, meta, rows, targets, notes)
        tmp.replace(out / f"{stem}.md")
        return meta, targets, notes

    rows = []
    for case in build_cases(args, device):
        rows += bench_case(case, args.variants, device, timer, cache, gen, args.check, max(copy_gbps),
                           lambda r: print(fmt_row(r), flush=True))
        save(rows, partial=True)
    copy_gbps.append(copy_bandwidth(device, timer))
    LOADAVG.append(os.getloadavg()[0])
    print(f"copy bandwidth at the end: {copy_gbps[1]:.1f} GB/s (fractions use {max(copy_gbps):.1f})")
    meta, targets, notes = save(rows, partial=False)

    print()
    print(f"targets ({sum(t['met'] for t in targets)}/{len(targets)} met):")
    for t in targets:
        print(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['goal']} (got {t['got']})")
    for n in notes:
        print(f"  slower: {n}")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {meta['wall_s']} s")
    failed = [r for r in rows if r.get("error") or (r.get("check") or "").startswith("FAIL")]
    if failed:
        print(f"{len(failed)} row(s) errored or failed their check")
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
