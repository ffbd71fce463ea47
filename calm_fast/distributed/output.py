"""One output folder written by every rank: a temporary folder beside `output` that rank 0
renames into place once every rank's part is on disk, and that every rank removes when any
rank fails (`output` must be on a filesystem every rank sees)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch.distributed as dist

from ..checkpoint import atomic_directory
from .collectives import DistributedMergeError, gather_checked, run_checked


def output_path(output) -> str:
    """A distributed merge's output folder as an absolute path: every rank must name the same."""
    if output is None:
        raise ValueError("calm_fast: a distributed merge writes its result: pass output=")
    return os.path.abspath(os.fspath(output))


def publish(output: str, write: Callable[[str], None], *, overwrite: bool, group=None) -> None:
    """write(folder) on every rank, into the one temporary folder. `write` raises
    DistributedMergeError on every rank when any rank's part fails (its work in run_checked)."""
    rank = dist.get_rank(group)

    def fill(folder: str | None) -> None:
        folder = gather_checked("sharing the output folder", lambda: folder, group)[0]
        try:
            write(folder)
        except DistributedMergeError:
            shutil.rmtree(folder, ignore_errors=True)  # on every rank: none returns before it is gone
            raise

    run_checked("publishing the output",
                lambda: atomic_directory(output, fill, overwrite=overwrite) if rank == 0 else fill(None), group)
