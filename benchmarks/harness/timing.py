"""Device synchronization and timing: warm-up, then the median over repeats; copy bandwidth."""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

MiB = 1 << 20


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable, device, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn() over reps calls after warm-up, the device synchronized around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Timer:
    """Per-call times in ms after warm-up. CPU: time.perf_counter around each call, >= 7 calls, more
    while the budget lasts. GPU: CUDA events around each call, a 256 MiB L2 flush before each, >= 10."""

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
            return self._events(fns)
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

    def _events(self, fns: list[Callable]) -> list[float]:
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
    """GB/s of a large dst.copy_(src) (CPU 256 MiB, GPU 1 GiB), counting bytes read + bytes written."""
    nbytes = (1024 if device.type == "cuda" else 256) * MiB
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = timer([lambda: dst.copy_(src)])
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def last_level_cache_bytes(device) -> int:
    """The GPU's L2, or the largest CPU cache level of cpu0 (sysfs)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * MiB) or 50 * MiB)
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgG]?)i?B?\s*", (idx / "size").read_text())
        except OSError:
            continue
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])
    return best or 32 * MiB
