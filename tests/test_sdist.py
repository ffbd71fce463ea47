"""The source distribution builds: it carries every input setup.py and CMakeLists.txt read (the
build lists, the sources they name, the headers those include, the CUDA kernels)."""
import os
import re
import shutil
import subprocess
import sys
import tarfile

import build_lists
from conftest import REPO

LISTS = ["csrc/SOURCES", "csrc/cpu/SOURCES", "csrc/cpu/ISAS"]
# What never goes into an sdist: environments, build trees, caches, results.
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", ".cache", ".whl", ".device-carry", "__pycache__",
                              "*.so", "*.egg-info", "results")


def _build_inputs() -> set[str]:
    """The build lists, every file they name and every local header reached from those files."""
    inputs = {"setup.py", "pyproject.toml", "CMakeLists.txt", "csrc/build_lists.py", *LISTS}
    inputs.update(build_lists.lines("csrc/SOURCES") + build_lists.lines("csrc/cpu/SOURCES"))
    todo = [p for p in inputs if p.endswith((".cpp", ".cu", ".h", ".cuh"))]
    while todo:
        source = REPO / todo.pop()
        for name in re.findall(r'#include "([^"]+)"', source.read_text()):
            header = next(str(p.relative_to(REPO)) for p in (source.parent / name, REPO / "csrc" / name,
                                                            REPO / "kernels" / "cuda" / name) if p.exists())
            if header not in inputs:
                inputs.add(header)
                todo.append(header)
    return inputs


def test_sdist_carries_every_build_input(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=SKIP)
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=tree,
                         env={**os.environ, "CALM_FAST_NO_CUDA": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (archive,) = tmp_path.glob("calm_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(_build_inputs() - members)
    assert not missing, f"the sdist lacks {missing}"
