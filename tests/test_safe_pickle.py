"""Whole pickled modules read without running pickled code: exact tensors, refused globals, nothing run."""
import os
import pickle

import pytest
import torch

from calm_fast import safe_pickle
from calm_fast.checkpoint import CheckpointError
from calm_fast.safe_pickle import UnsafePickleError


def _module():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.MultiheadAttention(7, 1),
                            torch.nn.Embedding(11, 7).half())
    m.register_buffer("steps", torch.arange(4))
    m.register_buffer("scratch", torch.ones(3), persistent=False)  # not in state_dict
    m[1].weight.requires_grad_(False)
    return m


def test_a_pickled_module_reads_back_as_its_exact_state_dict(tmp_path):
    m = _module()
    torch.save(m, tmp_path / "m.pt")
    root = safe_pickle.load(tmp_path / "m.pt")
    assert safe_pickle.class_name(root) == "torch.nn.modules.container.Sequential"
    got, want = safe_pickle.module_state_dict(root), m.state_dict()
    assert list(got) == list(want) and "scratch" not in got
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    carriers = [safe_pickle.class_name(c) for c, _ in safe_pickle.walk_modules(root)]
    assert "torch.nn.modules.activation.MultiheadAttention" in carriers


def test_views_and_shared_storages_keep_their_layout(tmp_path):
    base = torch.arange(24.0)
    obj = {"whole": base, "view": base[3:15].view(3, 4), "t": base[:12].view(3, 4).t()}
    torch.save(obj, tmp_path / "views.pt")
    got = safe_pickle.load(tmp_path / "views.pt")
    for key, value in obj.items():
        assert got[key].stride() == value.stride() and torch.equal(got[key], value), key
    assert got["view"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()


class _System:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


class _Eval:
    def __reduce__(self):
        return (eval, ("open('PWNED', 'w')",))


@pytest.mark.parametrize("payload, name", [(_System(), "system"), (_Eval(), "eval")])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch, payload, name):
    monkeypatch.chdir(tmp_path)
    m = _module()
    m.hook = payload  # buried in a module's state, after tensors were already read
    torch.save(m, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=rf"evil.pt: refusing the pickled global \S*{name}"):
        safe_pickle.load(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_known_classes_are_inert_carriers_even_when_called_with_arguments(tmp_path, monkeypatch):
    """A REDUCE of an allowed class name gets a PickledObject that records its arguments: the real
    class (here a `modeling.ImageEncoder` whose constructor would run a command) is never imported
    or called."""
    import sys
    import types

    monkeypatch.chdir(tmp_path)

    class ImageEncoder:
        def __init__(self, command):
            os.system(command)

        def __reduce__(self):
            return (ImageEncoder, ("touch PWNED",))

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "modeling", "ImageEncoder"
    fake = types.ModuleType("modeling")
    fake.ImageEncoder = ImageEncoder
    monkeypatch.setitem(sys.modules, "modeling", fake)
    encoder = object.__new__(ImageEncoder)
    torch.save({"t": encoder, "w": torch.ones(2)}, tmp_path / "c.pt")
    monkeypatch.delitem(sys.modules, "modeling")
    got = safe_pickle.load(tmp_path / "c.pt")
    assert isinstance(got["t"], safe_pickle.PickledObject) and got["t"].args == ("touch PWNED",)
    assert not (tmp_path / "PWNED").exists()


def test_unknown_classes_are_named_and_can_be_allowed_as_carriers(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.PReLU()), tmp_path / "m.pt")
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.activation.PReLU"):
        safe_pickle.load(tmp_path / "m.pt")
    root = safe_pickle.load(tmp_path / "m.pt", extra_classes={"torch.nn.modules.activation": {"PReLU"}})
    assert set(safe_pickle.module_state_dict(root)) == {"0.weight", "0.bias", "1.weight"}


def test_files_that_are_not_torch_zip_archives_are_clear_errors(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a torch.save zip archive"):
        safe_pickle.load(tmp_path / "legacy.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": 1}, f)
    with pytest.raises(CheckpointError, match="not a torch.save zip archive"):
        safe_pickle.load(tmp_path / "plain.pkl")
    torch.save({"w": torch.ones(1000)}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        safe_pickle.load(tmp_path / "cut.pt")
