"""Read whole pickled modules saved with torch.save(module) without running any pickled code.

Why: the fine-tuned CLIP checkpoints of the task-vectors family (task_vectors, TALL masks,
AdaMerging, ...) are `torch.save(image_encoder)` files: pickles of modules. `torch.load(
weights_only=True)` refuses them and `weights_only=False` runs whatever the pickle says. Here a
`pickle.Unpickler` subclass resolves every global itself (`find_class`):

- torch's tensor and parameter rebuild functions become our own functions, which only wrap the
  storages that `persistent_load` maps out of the zip archive (memory-mapped, read on use);
- `OrderedDict`, `set`, `torch.Size`, dtypes and storage types are plain data;
- a fixed list of known module classes (torch.nn, open_clip, torchvision transforms, the
  task-vectors repos' `ImageEncoder` / `ClassificationHead`) become `PickledObject` subclasses
  of the same name: inert carriers that record the constructor arguments and the pickled state
  and never call the class's code (the class is not even imported);
- anything else is refused with an error naming the global, before it could run.

`module_state_dict` then walks a carrier's `_parameters` / `_buffers` / `_modules` the way
`nn.Module.state_dict` does. Only torch's zip format (the default of torch.save since 1.6) is read.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import sys

import torch

from .checkpoint import CheckpointError

# module -> class (or function) names reconstructed as inert PickledObject carriers
_TORCH_NN = ("Module", "Linear", "NonDynamicallyQuantizableLinear", "Conv2d", "Conv1d", "LayerNorm",
             "GroupNorm", "BatchNorm2d", "GELU", "ReLU", "SiLU", "Tanh", "Sigmoid", "Softmax", "Identity",
             "Dropout", "MultiheadAttention", "Sequential", "ModuleList", "ModuleDict", "ParameterList",
             "ParameterDict", "Embedding", "AvgPool2d", "AdaptiveAvgPool2d", "MaxPool2d", "Flatten")
_TORCH_NN_MODULES = ("activation", "container", "conv", "dropout", "flatten", "linear", "module",
                     "normalization", "batchnorm", "sparse", "pooling")
_OPEN_CLIP_MODULES = ("CLIP", "CustomTextCLIP", "VisionTransformer", "VisualTransformer", "TextTransformer",
                      "Transformer", "ResidualAttentionBlock", "CustomResidualAttentionBlock", "Attention",
                      "AttentionalPooler", "LayerNorm", "LayerNormFp32", "QuickGELU", "LayerScale",
                      "PatchDropout", "ModifiedResNet", "AttentionPool2d", "Bottleneck")
_OPEN_CLIP_TRANSFORMS = ("_convert_to_rgb", "ResizeMaxSize", "ResizeKeepRatio", "CenterCropOrPad",
                         "MaybeConvertMode", "MaybeToTensor", "color_jitter", "gray_scale")
_TORCHVISION_TRANSFORMS = ("Compose", "Resize", "CenterCrop", "ToTensor", "PILToTensor", "Normalize",
                           "ConvertImageDtype", "RandomResizedCrop", "RandomHorizontalFlip", "RandomCrop",
                           "ColorJitter", "RandomGrayscale", "RandomApply")
_TASK_VECTORS = ("ImageEncoder", "ClassificationHead", "ImageClassifier", "MultiHeadImageClassifier")

KNOWN_CLASSES: dict[str, frozenset[str]] = {
    **{f"torch.nn.modules.{m}": frozenset(_TORCH_NN) for m in _TORCH_NN_MODULES},
    **{f"open_clip.{m}": frozenset(_OPEN_CLIP_MODULES) for m in ("model", "transformer", "modified_resnet")},
    "open_clip.transform": frozenset(_OPEN_CLIP_TRANSFORMS),
    "torchvision.transforms.transforms": frozenset(_TORCHVISION_TRANSFORMS),
    "torchvision.transforms.functional": frozenset({"InterpolationMode"}),
    "PIL.Image": frozenset({"Resampling"}),
    # where the task-vectors family defines its modules (task_vectors, AdaMerging: src/modeling.py)
    **{m: frozenset(_TASK_VECTORS) for m in ("src.modeling", "modeling", "src.models.modeling",
                                             "task_vectors.src.modeling")},
}

_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "double", "float", "half", "long", "int", "short")}
_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}


class UnsafePickleError(CheckpointError):
    """A pickle that names a global outside the allowed list: refused before anything ran."""


class PickledObject:
    """An inert stand-in for an instance of a pickled class: the class's module and name, the
    arguments it was rebuilt with and the state pickle gave it. Never runs the class's code."""

    pickled_module = ""
    pickled_name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args): keep them, do nothing else
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"__state__": state}

    def __getitem__(self, name):
        return self.state[name]

    def get(self, name, default=None):
        return self.state.get(name, default) if isinstance(self.state, dict) else default

    def __repr__(self):
        return f"<pickled {self.pickled_module}.{self.pickled_name}>"


def class_name(obj) -> str | None:
    """'module.Name' of a carrier, None for anything else."""
    return f"{obj.pickled_module}.{obj.pickled_name}" if isinstance(obj, PickledObject) else None


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# ---- torch's rebuild functions, reimplemented over our storages -------------------------------------
def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2 minus hooks and metadata: a view of the storage."""
    untyped, dtype = storage
    return torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, torch.Size(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    """Parameters are read as the tensors they hold: state dicts need nothing more."""
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0/1): only for carrier classes."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls.__new__(cls)


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    # types named by _rebuild_from_type_v2; never called
    ("torch", "Tensor"): torch.Tensor, ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.Tensor,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage, path: str, allowed: dict[str, frozenset[str]]):
        super().__init__(io.BytesIO(data))
        self._storage, self._path, self._allowed = storage, path, allowed
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if name in self._allowed.get(module, ()):
            key = (module, name)
            if key not in self._stubs:
                self._stubs[key] = type(name, (PickledObject,), {"pickled_module": module, "pickled_name": name,
                                                                 "__module__": __name__})
            return self._stubs[key]
        raise UnsafePickleError(f"calm_fast: {self._path}: refusing the pickled global {module}.{name} "
                                "(only torch tensors and a fixed list of module classes are read; no pickled "
                                "code is run)")

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"calm_fast: {self._path}: unexpected persistent id {saved_id!r:.80}")
        _, storage_type, key, _location, numel = saved_id
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"calm_fast: {self._path}: persistent id names no storage type")
        dtype = storage_type.dtype
        key = key.decode() if isinstance(key, bytes) else str(key)
        return self._storage(key, numel * dtype.itemsize, dtype), dtype


def load(path: str, *, extra_classes: dict[str, set[str]] | None = None):
    """The object pickled in a torch.save zip file, with every class instance a PickledObject and
    every tensor a real tensor (memory-mapped from the file). Raises UnsafePickleError naming the
    first global that is neither a torch rebuild function nor a known class."""
    allowed = dict(KNOWN_CLASSES)
    for module, names in (extra_classes or {}).items():
        allowed[module] = allowed.get(module, frozenset()) | frozenset(names)
    path = os.fspath(path)
    try:
        reader = torch._C.PyTorchFileReader(path)
    except RuntimeError as exc:
        raise CheckpointError(f"calm_fast: {path} is not a torch.save zip archive ({str(exc).splitlines()[0]}); "
                              "only the zip format (torch >= 1.6's default) is read") from exc
    records = set(reader.get_all_records())
    pickle_name = next((r for r in ("data.pkl",) if r in records), None)
    if pickle_name is None:
        raise CheckpointError(f"calm_fast: {path} holds no data.pkl (a TorchScript archive?)")
    byteorder = reader.get_record("byteorder").decode() if "byteorder" in records else "little"
    size = os.path.getsize(path)
    whole = torch.UntypedStorage.from_file(path, shared=False, nbytes=size) if size else None
    storages: dict[str, torch.UntypedStorage] = {}

    def storage(key: str, nbytes: int, dtype: torch.dtype) -> torch.UntypedStorage:
        if key not in storages:
            name = f"data/{key}"
            if name not in records:
                raise CheckpointError(f"calm_fast: {path}: storage {key} is missing from the archive")
            offset = reader.get_record_offset(name)
            if offset + nbytes > size:
                raise CheckpointError(f"calm_fast: {path}: storage {key} runs past the end of the file")
            untyped = whole[offset:offset + nbytes]
            if byteorder != sys.byteorder:
                untyped = untyped.clone()
                untyped.byteswap(dtype)
            storages[key] = untyped
        return storages[key]

    try:
        return _Unpickler(reader.get_record(pickle_name), storage, path, allowed).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"calm_fast: {path}: cannot read the pickle ({type(exc).__name__}: {exc})") from exc


def module_state_dict(obj: PickledObject, prefix: str = "", *, what: str = "module") -> dict[str, torch.Tensor]:
    """nn.Module.state_dict() of a pickled module: parameters, persistent buffers, then children,
    recursively, in pickled order."""
    out: dict[str, torch.Tensor] = {}
    for carrier, name in walk_modules(obj, prefix, what=what):
        state = carrier.state
        skip = state.get("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            for key, value in (state.get(kind) or {}).items():
                if value is None or (kind == "_buffers" and key in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"calm_fast: {what}: {name}{key} is a {type(value).__name__}, not a tensor")
                out[f"{name}{key}"] = value
    return out


def walk_modules(obj: PickledObject, prefix: str = "", *, what: str = "module"):
    """(carrier, 'dotted.prefix.') for a pickled module and all its submodules, depth first."""
    if not isinstance(obj, PickledObject) or not isinstance(obj.state, dict) or "_modules" not in obj.state:
        raise CheckpointError(f"calm_fast: {what}: {prefix.rstrip('.') or 'the root'} is "
                              f"{class_name(obj) or type(obj).__name__}, not a pickled torch module")
    yield obj, prefix
    for name, child in (obj.state.get("_modules") or {}).items():
        if child is not None:
            yield from walk_modules(child, f"{prefix}{name}.", what=what)
