"""Reads the build lists (csrc/SOURCES, csrc/cpu/SOURCES, csrc/cpu/ISAS) for setup.py and the tests;
CMakeLists.txt reads the same files its own way. No torch import: setup.py loads it before torch."""
from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lines(path: str) -> list[str]:
    """The non-comment lines of a list file, relative to the repository root."""
    text = (ROOT / path).read_text().splitlines()
    return [ln.strip() for ln in text if ln.strip() and not ln.startswith("#")]


def cpu_isas() -> dict[str, list[str]]:
    """name -> compiler flags of each CPU kernel build; the ISA-specific builds on x86-64 only."""
    isas = {name: flags for name, *flags in (ln.split() for ln in lines("csrc/cpu/ISAS"))}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return {name: flags for name, flags in isas.items() if x86 or not flags}
