"""The CPU kernels are built once per vector ISA (csrc/cpu/ISAS) and the package imports one. The
op tests in this process cover the loaded build; here every other build this CPU runs passes the
same native-cpu op tests in a subprocess, and the loader's choices and refusals are checked."""
import importlib.util
import os
import subprocess
import sys

import build_lists
import pytest
import torch

from calm_fast import _extension
from conftest import REPO

OP_TESTS = ["test_mask_ops.py", "test_consensus_merge.py", "test_magnitude_threshold.py",
            "test_entropy_argmax.py", "test_mask_packing.py", "test_errors.py"]
pytestmark = pytest.mark.skipif(not _extension.NATIVE, reason=f"native extension not built: {_extension.LOAD_ERROR}")


def _runnable() -> list[str]:
    best = _extension.CPU_ISAS.index(_extension.best_cpu_isa())
    return [isa for isa in _extension.CPU_ISAS[best:] if isa in build_lists.cpu_isas()]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_every_listed_isa_is_built():
    missing = [isa for isa in build_lists.cpu_isas() if importlib.util.find_spec(f"calm_fast._C_cpu_{isa}") is None]
    assert not missing, f"CPU kernel modules not built: {missing}"


def test_the_best_runnable_build_is_loaded():
    assert _extension.CPU_ISA == _runnable()[0]


@pytest.mark.parametrize("isa", _extension.CPU_ISAS)
def test_other_builds_pass_the_op_tests(isa):
    if isa == _extension.CPU_ISA:
        pytest.skip("the loaded build: the op tests of this process cover it")
    if isa not in _runnable():
        pytest.skip(f"this CPU does not run {isa}")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "native-cpu",
                          *OP_TESTS], cwd=REPO / "tests", env={**os.environ, "CALM_FAST_CPU_ISA": isa},
                         capture_output=True, text=True, timeout=900)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    # a build that failed to load would skip every native-cpu test instead of running it
    assert res.returncode == 0 and " passed" in summary and "skipped" not in summary, \
        res.stdout[-4000:] + res.stderr[-2000:]


def test_a_forced_isa_above_the_cpu_is_refused():
    res = _python("from calm_fast import _extension as e; print(e.NATIVE, '|', e.LOAD_ERROR)",
                  ATEN_CPU_CAPABILITY="default", CALM_FAST_CPU_ISA="avx2")
    assert res.stdout.startswith("False |") and "runs at most 'default'" in res.stdout, res.stdout + res.stderr


def test_an_unknown_isa_is_refused():
    res = _python("from calm_fast import _extension as e; print(e.NATIVE, '|', e.LOAD_ERROR)", CALM_FAST_CPU_ISA="sse9")
    assert res.stdout.startswith("False |") and "expected one of" in res.stdout, res.stdout + res.stderr


def test_aten_capability_lowers_the_choice():
    res = _python("from calm_fast import _extension as e; print(e.CPU_ISA)", ATEN_CPU_CAPABILITY="default")
    assert res.stdout.strip() == "default", res.stdout + res.stderr


OUTPUTS_SCRIPT = r"""
import sys, torch
from calm_fast import _extension
assert _extension.CPU_ISA == sys.argv[2], _extension.CPU_ISA
g = torch.Generator().manual_seed(int(sys.argv[3]))
n = 100_003
out = {}
for wd, dd in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)):
    s = torch.randn(n, generator=g) * 4
    w, grad = torch.randn(n, generator=g).to(wd), torch.randn(n, generator=g).to(wd)
    d = (torch.randn(n, generator=g) * 0.05).to(dd)
    torch.ops.calm_fast.mask_step_(s, w, grad, d, None, 30.0, 0.5, "polarize")
    out[f"mask_step {wd}"] = (s, w)
    out[f"sumsq {wd}"] = torch.ops.calm_fast.mask_grad_sumsq(s, grad, d)
    for mode in ("soft", "hard"):
        w2 = w.clone()
        torch.ops.calm_fast.masked_apply_(w2, d, s, mode)
        out[f"masked_apply {mode} {wd}"] = w2
tv = [torch.randn(n, generator=g) for _ in range(5)]
for method in ("sum", "ties", "consensus"):
    out[f"consensus_merge {method}"] = torch.ops.calm_fast.consensus_merge(tv, [0.3] * 5, [0.4] * 5, method, 2)
out["magnitude_threshold"] = torch.ops.calm_fast.magnitude_threshold(tv, 777)
out["pack_mask"] = torch.ops.calm_fast.pack_mask(tv[0])
out["entropy_argmax"] = torch.ops.calm_fast.entropy_argmax(torch.randn(512, 1003, generator=g) * 6)
torch.save(out, sys.argv[1])
"""


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (NaN payloads and signed zeros included)."""
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def test_builds_agree_bit_for_bit(tmp_path):
    """What README promises: every op gives the same bits on every ISA build (no FMA contraction;
    sums in fixed lanes, not in as many lanes as the vector is wide)."""
    isas = _runnable()
    if len(isas) < 2:
        pytest.skip("this CPU runs one build only")
    seed = int.from_bytes(os.urandom(2), "little")
    outputs = {}
    for isa in isas:
        path = tmp_path / f"{isa}.pt"
        res = subprocess.run([sys.executable, "-c", OUTPUTS_SCRIPT, str(path), isa, str(seed)],
                             env={**os.environ, "CALM_FAST_CPU_ISA": isa}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outputs[isa] = torch.load(path)
    first, *others = isas
    for isa in others:
        for name, want in outputs[first].items():
            got = outputs[isa][name]
            for a, b in zip(*((want, got) if isinstance(want, tuple) else ((want,), (got,)))):
                assert torch.equal(_bits(a), _bits(b)), f"{name}: {isa} differs from {first} (seed {seed})"
