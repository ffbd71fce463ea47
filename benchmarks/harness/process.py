"""A measurement in a fresh process (`python -m benchmarks.<name> --child ...`), so that its peaks
are its own: the child prints one RESULT line of JSON, the parent reads it back."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .metadata import ROOT

PREFIX = "RESULT "


def emit(result: dict) -> None:
    """The child's answer: one line on stdout."""
    print(PREFIX + json.dumps(result), flush=True)


def start_fresh(module: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m module args` from the repository root, its output captured."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, what: str, timeout: float | None = None) -> dict:
    """The RESULT the child printed; RuntimeError (with its output's tail) when it failed."""
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    return json.loads(lines[-1][len(PREFIX):])


def run_fresh(module: str, args: list[str], what: str, env: dict | None = None) -> dict:
    return finish(start_fresh(module, args, env), what)


def ranks_parser(doc: str, results: Path, hidden: tuple[str, ...]) -> argparse.ArgumentParser:
    """A multi-process benchmark's parser: --world, --out, and --child with the `hidden` flags the
    parent passes its fresh child processes (one per rank)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks of the distributed run")
    parser.add_argument("--out", type=Path, default=results)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for flag in hidden:
        parser.add_argument(flag, help=argparse.SUPPRESS)
    return parser
