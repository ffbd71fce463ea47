"""Sub-packages whose code lives outside calm_fast/: an installed calm_fast has them (setup.py's
package_dir reads SUBPACKAGES), a source tree with the extension built in place (`setup.py
build_ext --inplace`, as the GPU run does) does not, so `import_subpackage` loads them from the
tree there. Only the standard library here: setup.py runs this file before anything is built."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

# calm_fast.<name> -> its folder, relative to the repository root
SUBPACKAGES = {"triton_kernels": "kernels/triton", "benchmarks": "benchmarks"}


def import_subpackage(name: str):
    """calm_fast.<name>, installed or from the source tree this calm_fast/ sits in."""
    full_name = f"{__package__}.{name}"
    try:
        return importlib.import_module(full_name)
    except ModuleNotFoundError as exc:
        if exc.name != full_name:  # a missing dependency inside the sub-package: not ours to hide
            raise
    init = Path(__file__).resolve().parent.parent / SUBPACKAGES[name] / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"{full_name} is neither installed nor in a source tree at {init.parent}",
                                  name=full_name)
    spec = importlib.util.spec_from_file_location(full_name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full_name]
        raise
    setattr(sys.modules[__package__], name, module)
    return module
