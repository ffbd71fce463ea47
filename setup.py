"""Builds calm_fast._C with torch's cpp_extension (ninja). Sources: csrc/SOURCES.

The CUDA kernels are compiled when torch is a CUDA build and nvcc is found; set
CALM_FAST_NO_CUDA=1 to build the CPU kernels only; CALM_FAST_CPU_ARCH (default "native") is the
-march of the CPU kernels. Install with
`pip install --no-build-isolation --no-deps -e .` (torch must already be installed: an
isolated build environment would pull a different torch than the one the extension loads into).
"""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _sources():
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _cuda_home():
    """The toolkit root: torch guesses /usr/local from the /usr/local/bin/nvcc wrapper."""
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def _extension():
    import torch

    cuda_home = _cuda_home()
    with_cuda = bool(torch.version.cuda) and cuda_home and not os.environ.get("CALM_FAST_NO_CUDA")
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        if not torch.cuda.is_available():  # cpp_extension cannot guess archs without a GPU
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils import cpp_extension

    sources = [s for s in _sources() if with_cuda or not s.endswith(".cu")]
    # The CPU kernels are compute-bound at SSE2 width (two sigmoids per element): build them for
    # this machine's vector ISA (CALM_FAST_CPU_ARCH=x86-64 for a portable build). No FMA
    # contraction, so every ISA rounds like the reference. -std comes from cpp_extension.
    arch = os.environ.get("CALM_FAST_CPU_ARCH", "native")
    cxx = ["-O3", "-g0", "-fopenmp", f"-march={arch}", "-ffp-contract=off"]
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    kwargs = dict(
        name="calm_fast._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx + (["-DCALM_FAST_WITH_CUDA"] if with_cuda else [])},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-DCALM_FAST_WITH_CUDA"]
    return kind(**kwargs), cpp_extension.BuildExtension, with_cuda


extension, build_ext, with_cuda = _extension()
setup(
    ext_modules=[extension],
    # separate build trees, so CPU-only and CUDA builds of one checkout don't rebuild each other
    options={"build": {"build_base": "build/cuda" if with_cuda else "build/cpu"}},
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    # `calm-fast bench` runs benchmarks/bench_ops.py, so the benchmarks ship as calm_fast.benchmarks
    package_dir={"calm_fast": "calm_fast", "calm_fast.triton_kernels": "kernels/triton",
                 "calm_fast.benchmarks": "benchmarks"},
    packages=["calm_fast", "calm_fast.triton_kernels", "calm_fast.benchmarks"],
)
