"""The paper's setting end to end on tiny open_clip towers written in the task-vectors layout:
checkpoints read exactly (and the same numbers as an unsafe torch.load), heads, zero-shot heads,
image folders through CALM, the one command, evaluation, and the errors a user meets first."""
import json
import os
import shutil

import pytest
import torch
import yaml

import calm_fast
from calm_fast import task_vectors
from calm_fast.checkpoint import CheckpointError, read_checkpoint
from calm_fast.cli import main
from calm_fast.clip_tasks import CLIPTasks
from calm_fast.heads import read_task_vectors_head, zero_shot_head
from calm_fast.image_data import ImageFolderTask, Loader, eval_transform

import task_vectors_fixtures as tvf

MODEL = "calm-fast-tv-tiny"
TASKS = {"Alpha": 3, "Beta": 4}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paper")
    tvf.register_tiny(folder, MODEL)
    tvf.register_tiny(folder, "calm-fast-tv-wide", width=128)
    root, images = folder / "checkpoints" / MODEL, folder / "images"
    modules = tvf.write_layout(root, MODEL, TASKS, images)
    return root, images, modules


def _copy(layout, tmp_path):
    """A private copy of the layout, for tests that break it."""
    root, images, _ = layout
    shutil.copytree(root, tmp_path / "checkpoints" / MODEL)
    shutil.copytree(images, tmp_path / "images")
    return tmp_path / "checkpoints" / MODEL, tmp_path / "images"


def test_encoders_read_exactly_and_compute_what_the_unsafe_load_computes(layout):
    root, _, _ = layout
    images = torch.rand(5, 3, 32, 32)
    for path in (root / "zeroshot.pt", root / "Alpha" / "finetuned.pt"):
        encoder = task_vectors.read_encoder(str(path))
        unsafe = tvf.unsafe_load(path)  # the test's reference only
        want = unsafe.model.state_dict()
        assert list(encoder.state) == list(want)
        assert all(encoder.state[k].dtype == want[k].dtype and torch.equal(encoder.state[k], want[k]) for k in want)
        assert encoder.quick_gelu is True and not encoder.has_text_tower
        model = task_vectors.clip_model(MODEL, encoder.quick_gelu)
        task_vectors.load_into(model, encoder.state, str(path))
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), unsafe(images))


def test_heads_read_exactly_and_match_the_unsafe_module(layout):
    root, _, _ = layout
    features = torch.randn(6, 16)
    for task, classes in TASKS.items():
        head = read_task_vectors_head(str(root / f"head_{task}.pt"))
        unsafe = tvf.unsafe_load(root / f"head_{task}.pt")
        assert head.num_classes == classes and head.normalize is True
        assert torch.equal(head.weight, unsafe.weight.detach()) and torch.equal(head.bias, unsafe.bias.detach())
        with torch.no_grad():
            assert torch.allclose(head(features), unsafe(features), rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="not a ClassificationHead"):
        read_task_vectors_head(str(root / "zeroshot.pt"))


def test_zero_shot_heads_match_a_direct_open_clip_computation_and_are_cached(layout, tmp_path, monkeypatch):
    root, images, _ = layout
    oc = tvf.open_clip()
    clip = oc.create_model(MODEL, pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "text.pt")  # an open_clip checkpoint with the text tower
    tokenizer = oc.get_tokenizer(MODEL)
    classes, templates = ["red", "green", "blue"], ["a photo of a {}.", "a blurry photo of the {}."]
    with torch.no_grad():  # the CLIP recipe, written out
        rows = []
        for name in classes:
            e = clip.encode_text(tokenizer([t.format(name) for t in templates]))
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(e / e.norm())
        want = torch.stack(rows) * clip.logit_scale.exp()
    head = zero_shot_head(clip, tokenizer, classes, templates)
    assert torch.allclose(head.weight, want, rtol=1e-6, atol=1e-6) and head.normalize

    os.remove(shutil.copytree(root, tmp_path / "ck" / MODEL) / "head_Alpha.pt")
    spec = {"Alpha": {"classes": ["0", "1", "2"], "templates": templates}}
    jobs = dict(zeroshot=spec, heads_cache=str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="zero-shot heads need CLIP's text tower"):
        CLIPTasks(str(tmp_path / "ck" / MODEL), ["Alpha"], str(images), **jobs).heads()
    heads = CLIPTasks(str(tmp_path / "ck" / MODEL), ["Alpha"], str(images), text_tower=str(tmp_path / "text.pt"),
                      **jobs).heads()
    assert torch.allclose(heads["Alpha"].weight, zero_shot_head(clip, tokenizer, spec["Alpha"]["classes"],
                                                                templates).weight, atol=1e-6)
    cached = os.listdir(tmp_path / "cache" / MODEL)
    assert len(cached) == 1 and cached[0].startswith("Alpha-") and cached[0].endswith(".safetensors")
    monkeypatch.setattr(calm_fast.heads, "zero_shot_head", lambda *a, **k: pytest.fail("cache not used"))
    again = CLIPTasks(str(tmp_path / "ck" / MODEL), ["Alpha"], str(images), text_tower=str(tmp_path / "text.pt"),
                      **jobs).heads()
    assert torch.equal(again["Alpha"].weight, heads["Alpha"].weight)


def test_image_folders_labeled_flat_and_streamed_in_order(layout, tmp_path):
    _, images, modules = layout
    transform = eval_transform(modules["zeroshot"].model)
    labeled = ImageFolderTask(str(images / "Beta"), transform, task="Beta")
    assert labeled.labeled and labeled.label_rule == "integers" and len(labeled) == 4 * 6
    flat = tmp_path / "flat"
    tvf.write_images(flat, 2, 3, labeled=False)
    unlabeled = ImageFolderTask(str(flat), transform)
    assert not unlabeled.labeled and {unlabeled[i][1] for i in range(len(unlabeled))} == {-1}
    loader = Loader(None, workers=2)
    batches = list(loader.batches(labeled, 7))
    loader.close()
    assert [len(b[0]) for b in batches] == [7, 7, 7, 3]
    direct = torch.stack([labeled[i][0] for i in range(len(labeled))])
    assert torch.equal(torch.cat([b[0] for b in batches]), direct)
    assert torch.cat([b[1] for b in batches]).tolist() == [label for _, label in labeled.samples]
    assert direct.shape[1:] == (3, 32, 32)
    named = ImageFolderTask(str(images / "Alpha"), transform, class_names=["2", "0", "1"])
    assert {os.path.basename(os.path.dirname(p)): y for p, y in named.samples} == {"2": 0, "0": 1, "1": 2}


def test_calm_merges_the_layout_on_image_folders_and_evaluates(layout, tmp_path):
    root, images, _ = layout
    job = CLIPTasks(str(root), list(TASKS), str(images), workers=2)
    config = calm_fast.CALMConfig(sequential=("Beta",), updates=3, batch_size=8, score_batch_size=16)
    result = job.merge("calm", config=config, device="cpu", seed=0, progress=False)
    assert set(result.state_dict) == set(job.weights()[0]) and all(k.startswith("visual.") for k in result.state_dict)
    assert result.report.sequential == ["Beta"] and result.report.pool_sizes == {"Alpha": 18, "Beta": 24}
    assert set(result.report.pseudo_labels["Beta"]) == {0, 1, 2, 3}
    result.save(tmp_path / "merged")
    accuracy = job.evaluate(str(tmp_path / "merged"), device="cpu", progress=False)
    individual = job.evaluate("finetuned", device="cpu", progress=False)
    assert set(accuracy) == {"Alpha", "Beta", "mean"} and individual["mean"] >= 0.9
    assert accuracy["mean"] >= 0.5


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_command_from_the_layout_and_the_config_form_agree(layout, tmp_path, capsys, monkeypatch):
    root, images, _ = layout
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "merge", "--task-vectors", root, "--tasks", ",".join(TASKS), "--data", images,
                        "--option", "updates=2", "--option", "batch_size=8", "--option", "sequential=[Beta]",
                        "--workers", "2", "--device", "cpu", "-q")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "merged-calm")) == ["masks.safetensors", "model.safetensors", "report.json"]
    report = json.loads((tmp_path / "merged-calm" / "report.json").read_text())
    assert report["method"] == "calm" and report["report"]["sequential"] == ["Beta"]

    code, _, err = _cli(capsys, "merge", "--task-vectors", root, "--tasks", ",".join(TASKS), "--method", "ties",
                        "--output", "ties-flags", "-q")
    assert code == 0, err
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "method": "ties", "output": "ties-config", "device": "cpu",
        "task_vectors": {"root": str(root), "tasks": list(TASKS), "data": str(images)}}))
    code, _, err = _cli(capsys, "merge", tmp_path / "job.yaml", "-q")
    assert code == 0, err
    flags, config = read_checkpoint(str(tmp_path / "ties-flags")), read_checkpoint(str(tmp_path / "ties-config"))
    assert set(flags) == set(config) and all(torch.equal(flags[k], config[k]) for k in flags)

    code, out, err = _cli(capsys, "evaluate", "--task-vectors", root, "--tasks", ",".join(TASKS), "--data", images,
                          "--weights", "zeroshot", "finetuned", "merged-calm", "--device", "cpu", "--json", "-q")
    assert code == 0, err
    table = json.loads(out)
    assert set(table) == {"zeroshot", "finetuned", "merged-calm"}
    assert all(set(row) == {"Alpha", "Beta", "mean"} for row in table.values())
    code, out, err = _cli(capsys, "evaluate", tmp_path / "job.yaml", "-q")  # default weights: the config's output
    assert code == 0 and "ties-config" in out and "Alpha" in out, err


def test_errors_name_the_task_and_file(layout, tmp_path, capsys):
    root, images = _copy(layout, tmp_path)
    tasks = ",".join(TASKS)

    def fails(*args):
        code, _, err = _cli(capsys, "merge", "--task-vectors", root, "--tasks", tasks, "--data", images,
                            "--output", tmp_path / "out", "--device", "cpu", "-q", *args)
        assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
        return err

    assert "task 'Gamma': no folder" in fails("--tasks", "Alpha,Gamma")
    shutil.rmtree(images / "Beta")
    assert f"task 'Beta': no image folder {images / 'Beta'}" in fails()
    shutil.copytree(images / "Alpha", images / "Beta")
    shutil.rmtree(images / "Alpha")
    shutil.copytree(images / "Beta", images / "Alpha")
    shutil.copytree(layout[1] / "Beta" / "3", images / "Alpha" / "3")  # 4 class folders, a 3-class head
    assert "task 'Alpha': its head has 3 classes, but" in fails()
    os.remove(root / "head_Beta.pt")
    assert "task 'Beta': no head" in fails()
    assert "open_clip has no model 'nope'" in fails("--model", "nope")

    wide = tmp_path / "wide"  # a fine-tuned copy of another model in the same root
    tvf.write_layout(wide, "calm-fast-tv-wide", {"Alpha": 3})
    shutil.copy(wide / "Alpha" / "finetuned.pt", root / "Alpha" / "finetuned.pt")
    err = fails("--method", "task_arithmetic")
    assert "mixed models in one root? task 'Alpha'" in err and "Alpha/finetuned.pt" in err


def test_config_form_errors_name_the_field(layout, tmp_path):
    from calm_fast import config as config_file

    root, images, _ = layout
    base = {"method": "calm", "output": "out", "task_vectors": {"root": str(root), "tasks": list(TASKS)}}
    with pytest.raises(config_file.ConfigError, match="'task_vectors.data' is required for method 'calm'"):
        config_file.parse(base, str(tmp_path))
    with pytest.raises(config_file.ConfigError, match=r"replaces \['pretrained'\]"):
        config_file.parse({**base, "pretrained": "x.safetensors"}, str(tmp_path))
    with pytest.raises(config_file.ConfigError, match=r"unknown field\(s\) \['colour'\]"):
        config_file.parse({**base, "task_vectors": {**base["task_vectors"], "colour": 1}}, str(tmp_path))
    with pytest.raises(config_file.ConfigError, match="zero-shot entry"):
        config_file.parse({**base, "task_vectors": {**base["task_vectors"], "data": str(images),
                                                    "zeroshot": {"Alpha": {"names": []}}}}, str(tmp_path))
