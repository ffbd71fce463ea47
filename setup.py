"""Builds calm_fast's native modules with torch's cpp_extension (ninja): calm_fast._C (op schemas,
CUDA kernels; csrc/SOURCES) and one CPU kernel module calm_fast._C_cpu_<isa> per vector ISA
(csrc/cpu/SOURCES, csrc/cpu/ISAS), of which the package imports the best the CPU runs.

The CUDA kernels are compiled when torch is a CUDA build and nvcc is found; set
CALM_FAST_NO_CUDA=1 to build the CPU kernels only. Install with
`pip install --no-build-isolation --no-deps -e .` (torch must already be installed: an
isolated build environment would pull a different torch than the one the extension loads into).
"""
import os
import runpy
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
from build_lists import cpu_isas, lines  # noqa: E402  (the build lists, shared with the tests)

SUBPACKAGES = runpy.run_path(str(ROOT / "calm_fast" / "_source_tree.py"))["SUBPACKAGES"]


def _cuda_home():
    """The toolkit root: torch guesses /usr/local from the /usr/local/bin/nvcc wrapper."""
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def _modules():
    import torch

    cuda_home = _cuda_home()
    with_cuda = bool(torch.version.cuda) and cuda_home and not os.environ.get("CALM_FAST_NO_CUDA")
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        if not torch.cuda.is_available():  # cpp_extension cannot guess archs without a GPU
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils import cpp_extension

    # No FMA contraction, so every ISA rounds like the reference; -std comes from cpp_extension.
    cxx = ["-O3", "-g0", "-ffp-contract=off"]
    includes = [str(ROOT / "csrc")]
    core = dict(name="calm_fast._C", sources=[s for s in lines("csrc/SOURCES") if with_cuda or not s.endswith(".cu")],
                include_dirs=includes,
                extra_compile_args={"cxx": cxx + (["-DCALM_FAST_WITH_CUDA"] if with_cuda else [])})
    if with_cuda:
        core["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-DCALM_FAST_WITH_CUDA"]
    modules = [(cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(**core)]
    for isa, flags in cpu_isas().items():
        modules.append(cpp_extension.CppExtension(
            name=f"calm_fast._C_cpu_{isa}", sources=lines("csrc/cpu/SOURCES"), include_dirs=includes,
            extra_compile_args={"cxx": cxx + ["-fopenmp", f"-DCALM_FAST_CPU_ISA={isa}", *flags]},
            extra_link_args=["-fopenmp"]))

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Each module in its own temp folder: the CPU modules compile the same sources with other flags."""

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base

    # one build tree per (CPU-only or CUDA, torch version): builds of one checkout against the
    # different torch environments of scripts/test.sh don't rebuild (or reuse) each other's objects
    build_base = f"build/{'cuda' if with_cuda else 'cpu'}-torch-{torch.__version__}"
    return modules, BuildExt, build_base


def _packages_below(name: str, folder: str) -> list[str]:
    """calm_fast.<name> and the packages in its folder (benchmarks: harness, ops, e2e, ...)."""
    root = ROOT / folder
    return [".".join(("calm_fast", name, *init.parent.relative_to(root).parts))
            for init in sorted(root.rglob("__init__.py"))]


modules, build_ext, build_base = _modules()
setup(
    ext_modules=modules,
    options={"build": {"build_base": build_base}},
    cmdclass={"build_ext": build_ext},
    # sub-packages kept outside calm_fast/ (the Triton kernels; the benchmarks, which `calm-fast
    # bench` runs): one table, which a source tree without an install reads too
    package_dir={"calm_fast": "calm_fast", **{f"calm_fast.{name}": folder for name, folder in SUBPACKAGES.items()}},
    packages=["calm_fast", "calm_fast.calm", "calm_fast.distributed", "calm_fast.methods",
              *(package for name, folder in SUBPACKAGES.items() for package in _packages_below(name, folder))],
)
