"""What a benchmark records about its run: the machine, the versions, the git commit, the load."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
LIBRARY_SOURCES = ("calm_fast", "csrc", "kernels")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def command_output(cmd: list[str]) -> str | None:
    """stdout of a short command run in the repo (git, nvidia-smi), or None where it fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_sha() -> str | None:
    return command_output(["git", "rev-parse", "--short", "HEAD"])


def git_dirty() -> bool:
    """Whether the library's sources (calm_fast, csrc, kernels) differ from the commit."""
    return bool(command_output(["git", "status", "--porcelain", "--", *LIBRARY_SOURCES]))


def version(dist: str) -> str | None:
    """The installed version of a distribution, None where it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def loadavg() -> float:
    """The 1-minute load average (shared machines are noisy: recorded at a run's start and end)."""
    return os.getloadavg()[0]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def host_memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device) -> str:
    """cpu, or cuda-<gpu name>: the device part of a results file's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


def nvidia_smi(device) -> str | None:
    """driver version, memory and max SM clock of the GPU, as nvidia-smi prints them."""
    return command_output(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                           "--format=csv,noheader", f"--id={torch.device(device).index or 0}"])


def command_line(module: str, argv) -> str:
    """The command that reruns a benchmark: `python -m benchmarks.<name> <argv>` (also when it
    ran as calm_fast.benchmarks.<name>, the installed copy)."""
    module = module.removeprefix("calm_fast.").removesuffix(".__main__")
    return shlex.join(["python", "-m", module, *argv])


def run_metadata(device) -> dict:
    """What every benchmark records: device, cores, threads, versions, date, git commit."""
    device = torch.device(device)
    return {"device": device_name(device), "device_type": device.type, "cores": cores(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "date": utc_now(), "git": git_sha(), "git_dirty": git_dirty()}
