"""Checkpoints in and out the way merging users keep them.

Read: single or sharded `.safetensors` (with the Hugging Face index JSON), Hugging Face model
directories, `.pt`/`.bin` files (torch.load(weights_only=True): never unpickles code) and
open_clip checkpoints. safetensors are read lazily, one tensor per access, so a merge that
streams parameter by parameter holds one parameter per task, not whole models.

Write: safetensors sharded above `max_shard_bytes`, with an index, built under a temporary name
in the destination's folder and renamed into place: an interrupted write leaves nothing at the
destination.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size

# safetensors header dtype names (the format's spec) -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it claims to be: truncated, inconsistent, unsafe."""


class LazyStateDict(Mapping):
    """name -> tensor over safetensors files; each access reads that one tensor from disk.

    Shapes and dtypes come from the headers (`spec`), so checkpoints are validated without
    reading their data. A tensor is checked for NaN/Inf the first time it is read. Files are
    opened per access: safetensors maps the file and returns views into the mapping, so a handle
    kept open would keep every page ever read resident (RSS of T models after a streamed merge);
    per access, only the tensors still referenced stay mapped.
    """

    def __init__(self, files: list[str], what: str):
        from safetensors import safe_open

        self.what = what
        self._entries: dict[str, tuple[str, str]] = {}  # name -> (file, name stored in the file)
        self._specs = {}
        self._checked: set[str] = set()
        for path in files:
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        if key in self._entries:
                            raise CheckpointError(f"calm_fast: {what}: {key} is in both "
                                                  f"{self._entries[key][0]} and {path}")
                        self._entries[key] = (path, key)
                        view = handle.get_slice(key)
                        self._specs[key] = (torch.Size(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
            except CheckpointError:
                raise
            except Exception as exc:  # SafetensorError: truncated, bad header
                raise CheckpointError(f"calm_fast: {what}: {path} is not a readable safetensors file "
                                      f"({exc})") from exc

    def keys_of(self, path: str) -> set[str]:
        """The names stored in one of the files."""
        return {stored for file, stored in self._entries.values() if file == path}

    def without_prefix(self, prefix: str) -> LazyStateDict:
        """The same tensors, with `prefix` dropped from the names that start with it."""
        return self.renamed({name: name[len(prefix):] if name.startswith(prefix) else name for name in self})

    def renamed(self, names: Mapping[str, str]) -> LazyStateDict:
        """The tensors `names` lists (old name -> new name), under their new names; still lazy."""
        renamed = LazyStateDict([], self.what)
        for name, new in names.items():
            renamed._entries[new], renamed._specs[new] = self._entries[name], self._specs[name]
        return renamed

    def spec(self, key: str) -> tuple[torch.Size, torch.dtype]:
        return self._specs[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path, stored = self._entries[key]
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(stored)
        if key not in self._checked:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"calm_fast: {self.what}: {key} holds NaN or Inf")
            self._checked.add(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def spec(state: Mapping, key: str) -> tuple[torch.Size, torch.dtype]:
    """(shape, dtype) of one entry, without reading a lazy tensor's data."""
    if hasattr(state, "spec"):  # LazyStateDict, or a mapping that reads or gathers on access
        return state.spec(key)
    return state[key].shape, state[key].dtype


# ---- reading ------------------------------------------------------------------------------------
def read_checkpoint(path: str, what: str = "weights") -> Mapping[str, torch.Tensor]:
    """Weights at `path`: a file, a sharded index JSON, or a Hugging Face model directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"calm_fast: {what}: no checkpoint at {path}")
    if os.path.isdir(path):
        return _read_directory(path, what)
    if path.endswith(".index.json"):
        return _read_index(path, what)
    if path.endswith(".safetensors"):
        return LazyStateDict([path], what)
    return _read_torch_file(path, what)


def _read_directory(path: str, what: str):
    for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TORCH_INDEX, TORCH_SINGLE):
        candidate = os.path.join(path, name)
        if os.path.exists(candidate):
            return read_checkpoint(candidate, what)
    raise FileNotFoundError(f"calm_fast: {what}: {path} holds none of {SAFETENSORS_INDEX}, "
                            f"{SAFETENSORS_SINGLE}, {TORCH_INDEX}, {TORCH_SINGLE}")


def _read_index(path: str, what: str):
    """A sharded checkpoint: every shard must exist and hold exactly the keys the index gives it."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"calm_fast: {what}: {path} is not a shard index with a weight_map "
                              f"({exc})") from exc
    folder = os.path.dirname(path)
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(os.path.join(folder, shard), set()).add(key)
    for shard in by_shard:
        if not os.path.exists(shard):
            raise FileNotFoundError(f"calm_fast: {what}: shard {os.path.basename(shard)} named by {path} "
                                    "does not exist")
    if path.endswith(".safetensors.index.json"):
        state = LazyStateDict(list(by_shard), what)
        for shard, keys in by_shard.items():
            _check_shard(path, shard, keys, state.keys_of(shard), what)
        return state
    state = {}
    for shard, keys in by_shard.items():
        part = _read_torch_file(shard, what)
        _check_shard(path, shard, keys, set(part), what)
        state.update(part)
    return {key: state[key] for key in weight_map}


def _check_shard(index: str, shard: str, expected: set[str], found: set[str], what: str) -> None:
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(f"calm_fast: {what}: shard {os.path.basename(shard)} does not match {index}: "
                              f"lacks {missing[:3]}, holds unlisted {extra[:3]}")


def _read_torch_file(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        try:  # memory-mapped where the file is in torch's zip format: tensors paged in on use
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; say so plainly
        raise CheckpointError(f"calm_fast: {what}: {path} is not a plain tensor checkpoint "
                              f"(torch.load(weights_only=True) refused it: {exc})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"calm_fast: {what}: {path} does not hold a name -> tensor mapping")
    return dict(obj)


def read_without_prefix(path: str, what: str = "weights", prefix: str = "module.") -> Mapping[str, torch.Tensor]:
    """read_checkpoint, with DataParallel's `prefix` dropped from the names (still lazy)."""
    state = read_checkpoint(path, what)
    if isinstance(state, LazyStateDict):
        return state.without_prefix(prefix)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def open_clip_model(model_name: str, checkpoint: str | None = None, *, what: str = "weights") -> torch.nn.Module:
    """An open_clip model (no download: pretrained=None) with the weights of `checkpoint`.

    The checkpoint is read like any other (safetensors or weights_only torch file; a
    {"state_dict": ...} wrapper and DataParallel's "module." prefix are accepted).
    """
    try:
        import open_clip
    except Exception as exc:  # ImportError, or torchvision's ops failing to register on import
        raise ImportError(f"calm_fast: open_clip checkpoints need open_clip_torch importable ({exc})") from exc
    if model_name not in open_clip.list_models():
        raise ValueError(f"calm_fast: {what}: open_clip has no model {model_name!r}")
    model = open_clip.create_model(model_name, pretrained=None)
    if checkpoint is not None:
        state = read_without_prefix(checkpoint, what)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"calm_fast: {what}: {checkpoint} does not fit open_clip {model_name}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        try:
            model.load_state_dict(dict(state.items()))
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"calm_fast: {what}: {checkpoint} does not fit open_clip {model_name}: {exc}") from exc
    return model


# ---- writing ------------------------------------------------------------------------------------
def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Keys in order, grouped greedily into shards of at most max_shard_bytes (a larger tensor
    gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"calm_fast: max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards, current, filled = [], [], 0
    for key, size in sizes.items():
        if current and filled + size > max_shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    if current or not shards:
        shards.append(current)
    return shards


def write_safetensors_dir(state: Mapping[str, torch.Tensor], folder: str, *,
                          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict | None = None,
                          progress: Callable | None = None) -> list[str]:
    """Write `state` into an existing folder as Hugging Face does: model.safetensors, or
    model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    sizes = {key: spec(state, key)[0].numel() * spec(state, key)[1].itemsize for key in state}
    shards = plan_shards(sizes, max_shard_bytes)
    pairs = list(zip(shard_names(len(shards)), shards))
    header = {"format": "pt", **(metadata or {})}
    for name, keys in (progress(pairs, desc="writing shards") if progress else pairs):
        save_file({key: state[key].contiguous() for key in keys}, os.path.join(folder, name), metadata=header)
    write_index(folder, pairs, sum(sizes.values()))
    return [name for name, _ in pairs]


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names for `count` safetensors shards (one: model.safetensors)."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(folder: str, files: list[tuple[str, list[str]]], total_size: int) -> None:
    """model.safetensors.index.json for (file name, keys) shards; none for a single file."""
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {key: name for name, keys in files for key in keys}}
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: str, folder: bool) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give them the usual umask modes."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
    if folder:
        for name in os.listdir(path):
            os.chmod(os.path.join(path, name), 0o666 & ~_umask())


def atomic_directory(destination: str, write: Callable[[str], None], *, overwrite: bool = False) -> None:
    """Run write(tmp_folder) on a fresh folder beside `destination`, then rename it into place.

    On any failure the temporary folder is removed and `destination` is untouched.
    """
    destination = os.path.abspath(destination)
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(f"calm_fast: {destination} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.tmp-", dir=parent)
    try:
        write(tmp)
        _publishable(tmp, folder=True)
        if os.path.exists(destination):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.old-", dir=parent)
            os.replace(destination, os.path.join(old, "replaced"))
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(destination: str, write: Callable[[str], None]) -> None:
    """Run write(tmp_path) on a temporary file beside `destination`, then rename it into place."""
    destination = os.path.abspath(destination)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(destination)}.tmp-",
                               dir=os.path.dirname(destination))
    os.close(fd)
    try:
        write(tmp)
        _publishable(tmp, folder=False)
        os.replace(tmp, destination)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                    progress: Callable | None = None) -> None:
    """`path` ending in .safetensors: one file; otherwise a folder, sharded as needed. Atomic."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"calm_fast: {path} exists; pass overwrite=True to replace it")
        atomic_file(path, lambda tmp: save_file({k: t.contiguous() for k, t in state.items()}, tmp,
                                                metadata={"format": "pt"}))
        return
    atomic_directory(path, lambda tmp: write_safetensors_dir(state, tmp, max_shard_bytes=max_shard_bytes,
                                                             progress=progress), overwrite=overwrite)


def parse_size(text: str | int) -> int:
    """Bytes from 5000000, "5GB", "500MB", "2GiB"."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in units or value <= 0:
        raise ValueError(f"calm_fast: not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(value * units[unit])
