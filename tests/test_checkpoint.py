"""Checkpoints in and out: lazy and sharded safetensors, HF folders, torch files, atomic writes,
and broken or malicious inputs (clear errors, nothing written)."""
import importlib.util
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import calm_fast
from calm_fast import checkpoint
from calm_fast.checkpoint import CheckpointError, LazyStateDict, read_checkpoint, save_checkpoint


def _state(seed=0):
    """Every dtype the writer must round-trip, a 0-d tensor, an empty one, odd sizes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(37, 16, generator=g),
        "block.0.attn.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "block.0.mlp.weight": torch.randn(33, 16, generator=g).to(torch.float16),
        "block.0.mlp.bias": torch.randn(33, generator=g).double(),
        "scale": torch.tensor(0.5),
        "empty": torch.empty(0, 4),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
        "mask": torch.rand(9, generator=g) > 0.5,
    }


def _equal(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("max_shard_bytes", [1, 700, 10**9])
def test_sharded_round_trip_is_bit_identical(tmp_path, max_shard_bytes):
    state = _state()
    out = tmp_path / "model"
    save_checkpoint(state, str(out), max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(out))
    if max_shard_bytes == 10**9:
        assert files == ["model.safetensors"]
    else:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 2 and "model.safetensors.index.json" in files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    back = read_checkpoint(str(out))
    assert isinstance(back, LazyStateDict)
    _equal(state, dict(back.items()))


def test_shards_hold_at_most_the_limit_unless_one_tensor_is_larger():
    sizes = {"a": 40, "b": 30, "c": 100, "d": 10, "e": 20}
    assert checkpoint.plan_shards(sizes, 70) == [["a", "b"], ["c"], ["d", "e"]]
    assert checkpoint.plan_shards({}, 70) == [[]]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        checkpoint.plan_shards(sizes, 0)


def test_lazy_reads_shapes_without_data_and_checks_nan_on_read(tmp_path):
    state = _state()
    state["embed.weight"][3, 3] = float("nan")
    save_file(state, str(tmp_path / "w.safetensors"))
    lazy = read_checkpoint(str(tmp_path / "w.safetensors"), "task 'x'")
    assert lazy.spec("block.0.attn.weight") == (torch.Size([16, 16]), torch.bfloat16)
    assert torch.equal(lazy["steps"], state["steps"])
    with pytest.raises(ValueError, match=r"task 'x': embed.weight holds NaN"):
        lazy["embed.weight"]


def test_hugging_face_folders_and_torch_files(tmp_path):
    state = {k: v for k, v in _state().items()}
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    _equal(state, read_checkpoint(str(single)))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(state)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:3], "pytorch_model-00002-of-00002.bin": keys[3:]}
    for name, part in parts.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _equal(state, read_checkpoint(str(sharded)))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    _equal(state, read_checkpoint(str(wrapped)))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        read_checkpoint(str(tmp_path / "single" / ".."))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f, protocol=2)
    torch.save({"w": torch.zeros(2), "x": _Payload()}, tmp_path / "evil_zip.pt")
    for bad in (path, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
            read_checkpoint(str(bad))
    assert not (tmp_path / "PWNED").exists()


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_file(_state(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    for cut in (len(data) - 7, 30, 4):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.safetensors is not a readable safetensors file"):
            read_checkpoint(str(tmp_path / "cut.safetensors"))


def _sharded(tmp_path):
    out = tmp_path / "model"
    save_checkpoint(_state(), str(out), max_shard_bytes=700)
    return out, json.loads((out / "model.safetensors.index.json").read_text())


def test_missing_shard_and_mismatched_index_are_clear_errors(tmp_path):
    out, index = _sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[1]
    os.rename(out / shard, tmp_path / "aside")
    with pytest.raises(FileNotFoundError, match=f"shard {shard} named by .* does not exist"):
        read_checkpoint(str(out))
    os.rename(tmp_path / "aside", out / shard)
    moved = dict(index)
    key = next(k for k, v in index["weight_map"].items() if v == shard)
    moved["weight_map"] = {**index["weight_map"], key: sorted(set(index["weight_map"].values()))[0]}
    (out / "model.safetensors.index.json").write_text(json.dumps(moved))
    with pytest.raises(CheckpointError, match="does not match"):
        read_checkpoint(str(out))
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a shard index"):
        read_checkpoint(str(out))


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "merged"

    def write_then_fail(folder):
        checkpoint.write_safetensors_dir(_state(), folder, max_shard_bytes=700)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_directory(str(out), write_then_fail)
    assert os.listdir(tmp_path) == []
    save_checkpoint(_state(0), str(out))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(_state(1), str(out))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_directory(str(out), write_then_fail, overwrite=True)
    assert os.listdir(tmp_path) == ["merged"]
    _equal(_state(0), read_checkpoint(str(out)))
    save_checkpoint(_state(1), str(out), overwrite=True)
    _equal(_state(1), read_checkpoint(str(out)))
    assert os.listdir(tmp_path) == ["merged"]


def test_single_file_write_is_atomic(tmp_path):
    path = tmp_path / "w.safetensors"

    def fail(_tmp):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_file(str(path), fail)
    assert os.listdir(tmp_path) == []
    save_checkpoint(_state(), str(path))
    _equal(_state(), read_checkpoint(str(path)))


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500 MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                            ("1.5KB", 1500), (4096, 4096), ("123", 123)])
def test_parse_size(text, expected):
    assert checkpoint.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "five GB", "-1MB", "3XB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        checkpoint.parse_size(text)


def test_merge_reads_checkpoint_paths_and_streams_to_the_same_result(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {"a.weight": torch.randn(64, 8, generator=g), "a.bias": torch.randn(8, generator=g),
           "count": torch.tensor(7)}
    tasks = {f"t{i}": {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                       for k, v in pre.items()} for i in range(3)}
    save_checkpoint(pre, str(tmp_path / "pre"), max_shard_bytes=300)
    paths = {}
    for name, state in tasks.items():
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_checkpoint(state, paths[name])
    for method in ("task_arithmetic", "ties", "consensus"):
        from_disk = calm_fast.merge(str(tmp_path / "pre"), paths, method=method, device="cpu", progress=False)
        in_memory = calm_fast.merge(pre, tasks, method=method, device="cpu", progress=False)
        _equal(in_memory.state_dict, from_disk.state_dict)
        assert list(from_disk.state_dict) == list(pre)


def test_merge_names_the_task_and_key_of_nan_in_a_lazy_checkpoint(tmp_path):
    pre = {"w": torch.zeros(4)}
    bad = {"w": torch.tensor([0.0, float("inf"), 0.0, 0.0])}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="task 'bad': w holds NaN or Inf"):
        calm_fast.merge(str(tmp_path / "pre.safetensors"), {"bad": str(tmp_path / "bad.safetensors")},
                        method="task_arithmetic", device="cpu", progress=False)


def _open_clip():
    """open_clip, through the benchmarks' torchvision workaround (this machine's CPU torch
    beside a CUDA torchvision wheel)."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "open_clip_compat.py"
    spec = importlib.util.spec_from_file_location("open_clip_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.import_open_clip()


def _tiny_open_clip(tmp_path, name):
    """open_clip with a tiny CLIP registered as `name` (no weights are downloaded anywhere)."""
    open_clip = _open_clip()
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "configs"))
    return open_clip


def test_open_clip_checkpoint_loads_into_the_named_architecture(tmp_path):
    open_clip = _tiny_open_clip(tmp_path, "calm-fast-tiny")
    source = open_clip.create_model("calm-fast-tiny", pretrained=None)
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "tiny.pt")
    model = checkpoint.open_clip_model("calm-fast-tiny", str(tmp_path / "tiny.pt"))
    _equal(source.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match="open_clip has no model 'nope'"):
        checkpoint.open_clip_model("nope")
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(KeyError, match="does not fit open_clip calm-fast-tiny"):
        checkpoint.open_clip_model("calm-fast-tiny", str(tmp_path / "other.pt"))
    state["module.visual.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "resized.pt")
    with pytest.raises(ValueError, match="size mismatch for visual.conv1.weight"):
        checkpoint.open_clip_model("calm-fast-tiny", str(tmp_path / "resized.pt"))


def test_open_clip_sources_in_a_config_read_finetuned_weights_lazily(tmp_path):
    from calm_fast import config as config_file

    open_clip = _tiny_open_clip(tmp_path, "calm-fast-tiny2")
    pre = open_clip.create_model("calm-fast-tiny2", pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in pre.items()}, str(tmp_path / "pre.safetensors"))
    g = torch.Generator().manual_seed(0)
    tuned = {}
    for task in ("a", "b"):
        tuned[task] = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                       for k, v in pre.items()}
        save_file({f"module.{k}": v.contiguous() for k, v in tuned[task].items()}, str(tmp_path / f"{task}.safetensors"))
    job = config_file.parse({
        "method": "task_arithmetic", "output": "out",
        "pretrained": {"open_clip": "calm-fast-tiny2", "checkpoint": "pre.safetensors"},
        "finetuned": {t: {"open_clip": "calm-fast-tiny2", "checkpoint": f"{t}.safetensors"} for t in tuned}},
        str(tmp_path))
    pretrained, finetuned = job.weights()
    assert isinstance(pretrained, torch.nn.Module)
    assert all(isinstance(w, LazyStateDict) and set(w) == set(pre) for w in finetuned.values())
    got = calm_fast.merge(pretrained, finetuned, method="task_arithmetic", device="cpu", progress=False)
    want = calm_fast.merge(pre, tuned, method="task_arithmetic", device="cpu", progress=False)
    _equal(want.state_dict, got.state_dict)
