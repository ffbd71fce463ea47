"""Peak memory over a region: host RSS (the kernel's VmHWM after a reset, or a sampler thread)
and device memory (the CUDA caching allocator's peak); the heap settings the benchmarks fix."""
from __future__ import annotations

import ctypes
import gc
import threading
import time

import torch

from .timing import sync

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def read_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in STATUS_FIELDS:
                out[name] = int(value.split()[0]) * 1024  # kB
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (/proc/self/clear_refs, Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """gc, then glibc's malloc_trim: freed heap goes back to the OS, so RSS starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fix_malloc_mmap_threshold(nbytes: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD, nbytes): a fixed threshold, which also turns off glibc's
    dynamic raising of it (freed parameter-sized buffers then go back to the OS)."""
    if not ctypes.CDLL("libc.so.6").mallopt(-3, nbytes):  # -3 = M_MMAP_THRESHOLD
        raise SystemExit(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


class Sampler(threading.Thread):
    """Polls /proc/self/status; keeps the peak RssAnon (with RssFile at that moment), the peak
    RssFile and the peak VmRSS."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self.samples = 0
        self.peak_anon = self.file_at_peak_anon = self.peak_file = self.peak_rss = 0

    def sample(self) -> None:
        s = read_status()
        self.samples += 1
        if s["RssAnon"] > self.peak_anon:
            self.peak_anon, self.file_at_peak_anon = s["RssAnon"], s["RssFile"]
        self.peak_file = max(self.peak_file, s["RssFile"])
        self.peak_rss = max(self.peak_rss, s["VmRSS"])

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


class MemoryWindow:
    """Peak host RSS and peak device memory between __enter__ and __exit__.

    Start: gc + malloc_trim, the baseline /proc/self/status, VmHWM reset, the CUDA peak reset.
    sample: "always" runs a Sampler thread (peak RssAnon / RssFile too), "fallback" only where
    VmHWM cannot be reset, "never" not at all. After the window: baseline, end (status dicts),
    hwm_reset, sampler, peak_rss (bytes; VmHWM where it was reset, else sampled), and on CUDA
    device_start, device_peak, device_peak_reserved (bytes)."""

    def __init__(self, device="cpu", sample: str = "always", interval: float = 0.001):
        self.device, self.sample, self.interval = torch.device(device), sample, interval
        self.sampler: Sampler | None = None
        self.device_start = self.device_peak = self.device_peak_reserved = None

    def __enter__(self):
        trim_heap()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_start = torch.cuda.memory_allocated(self.device)
        self.baseline = read_status()
        self.hwm_reset = reset_peak()
        if self.sample == "always" or (self.sample == "fallback" and not self.hwm_reset):
            self.sampler = Sampler(self.interval)
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        if self.sampler is not None:
            self.sampler.stop()
        self.end = read_status()
        sampled = self.sampler.peak_rss if self.sampler else 0
        self.peak_rss = max(self.end["VmHWM"] if self.hwm_reset else 0, self.end["VmRSS"], sampled,
                            self.baseline["VmRSS"])
        if self.device.type == "cuda":
            self.device_peak = torch.cuda.max_memory_allocated(self.device)
            self.device_peak_reserved = torch.cuda.max_memory_reserved(self.device)
        return False

    @property
    def peak_anon_above_baseline(self) -> int | None:
        """Sampled peak RssAnon above the baseline (None without a sampler)."""
        return self.sampler.peak_anon - self.baseline["RssAnon"] if self.sampler else None
