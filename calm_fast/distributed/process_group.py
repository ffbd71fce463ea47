"""A process group that is really gone when the merge is done.

`torch.distributed.destroy_process_group()` drops torch's own registry of the group, but two
other holders keep the group object, and with it gloo's threads, alive until the interpreter
tears itself down (measured with torch 2.13 by the threads left running; a 2-rank CALM test that
had finished its work aborted once in CI with "terminate called without an active exception",
the suspected consequence, never reproduced here):
- `torch.distributed.nn.functional` binds `group.WORLD` into its functions' default arguments
  when it is imported, which FSDP's import does: imported after `init_process_group`, those
  defaults hold the group for the life of the process. Hence FSDP is imported before the group
  exists.
- DTensor's sharding-propagation caches keep the DTensor specs of the sharded model, and each
  spec its DeviceMesh, which holds the group. Hence the caches are cleared (they refill on
  demand) and reference cycles collected before the group is destroyed.
"""
from __future__ import annotations

import contextlib
import gc

import torch.distributed as dist


@contextlib.contextmanager
def process_group(backend: str, **init_kwargs):
    """`init_process_group(backend, **init_kwargs)` for the body, then `destroy_process_group()`,
    also when the body raises. Every rank must leave the body at the same point."""
    import torch.distributed.fsdp  # noqa: F401  (before the group exists: see the module docstring)

    dist.init_process_group(backend, **init_kwargs)
    try:
        yield
    finally:
        _release_and_destroy()


def _release_and_destroy() -> None:
    """`dist.destroy_process_group()` after dropping the DTensor caches and the garbage that still
    hold the group, so its threads end here rather than during interpreter shutdown."""
    from torch.distributed.tensor import debug

    clear_caches = getattr(debug, "_clear_sharding_prop_cache", None)  # private: absent in some torch versions
    if clear_caches is not None:
        clear_caches()
    gc.collect()
    dist.destroy_process_group()
