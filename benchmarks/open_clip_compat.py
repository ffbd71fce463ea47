"""import open_clip where torchvision's compiled ops cannot load.

Beside a CPU torch, the matching torchvision wheel may be a CUDA build whose compiled ops do not
load (`operator torchvision::nms does not exist` on import). import_open_clip() then defines the
torchvision::nms / qnms schemas torchvision's import registers fakes for, so open_clip imports.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch


def import_open_clip():
    """import open_clip; where torchvision's compiled ops cannot load (a CUDA torchvision wheel
    beside a CPU torch), define the torchvision::nms / qnms schemas its import registers fakes for."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and "torchvision" not in sys.modules and not _torchvision_ops_exist():
        loaded = False
        for lib in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
            try:
                torch.ops.load_library(lib)
                loaded = True
                break
            except Exception:  # noqa: BLE001  (OSError / RuntimeError: undefined symbols, no CUDA)
                pass
        if not loaded and not _torchvision_ops_exist():
            lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _STUBS.append(lib)
    import open_clip

    return open_clip


_STUBS: list = []


def _torchvision_ops_exist() -> bool:
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "Meta")
        return True
    except RuntimeError:
        return False


def torchvision_ops_stubbed() -> bool:
    """Whether import_open_clip() had to define the torchvision schemas itself."""
    return bool(_STUBS)
