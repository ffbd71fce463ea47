"""open_clip (and torchvision, and transformers), imported the one way that works on every machine here.

Beside a CPU torch, the torchvision wheel may be a CUDA build whose compiled ops do not load, and
then `import open_clip` fails inside torchvision. benchmarks/open_clip_compat.py holds the
workaround (define the two op schemas torchvision's import needs); it is shipped as
calm_fast.benchmarks, so the library reuses it instead of keeping a second copy.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys


def import_open_clip():
    """The open_clip module; ImportError with the reason when it cannot be imported."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    from ._source_tree import import_subpackage

    try:
        compat = importlib.import_module(f"{import_subpackage('benchmarks').__name__}.open_clip_compat")
    except ModuleNotFoundError:  # an installation without the benchmarks: plain import
        compat = None
    try:
        if compat is not None:
            return compat.import_open_clip()
        import open_clip

        return open_clip
    except Exception as exc:  # ImportError, or torchvision's compiled ops failing to register on import
        raise ImportError(f"calm_fast: CLIP checkpoints need open_clip_torch importable ({exc})") from exc


HF_EXTRA_HINT = "pip install 'calm_fast[hf]'"


def import_transformers():
    """The transformers module (an optional dependency: the `hf` extra); ImportError naming the
    extra when it is missing. transformers imports torchvision when it is installed, so where
    torchvision's compiled ops do not load, open_clip's way in (above) runs first."""
    if sys.modules.get("transformers") is not None:
        return sys.modules["transformers"]
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        try:
            import_open_clip()  # defines the op schemas torchvision's import needs where its own do not load
        except ImportError:
            pass
    try:
        import transformers
    except ImportError as exc:
        missing = exc.name == "transformers" or "transformers" in str(exc).split("'")
        reason = "transformers is not installed" if missing else f"transformers cannot be imported ({exc})"
        raise ImportError(f"calm_fast: Hugging Face CLIP folders (the FusionBench form) need the optional "
                          f"dependency transformers: {reason}; install it with {HF_EXTRA_HINT}") from exc
    return transformers
