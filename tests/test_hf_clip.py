"""The FusionBench form end to end on tiny Hugging Face CLIP folders written by the tests: a random
CLIPModel (with a tokenizer) as _pretrained_/, perturbed CLIPVisionModel folders per task in the
layouts transformers 4 and 5 save (and a pytorch_model.bin), read back exactly; zero-shot heads
against transformers' own CLIPModel.get_text_features; CALM and a data-free merge through the CLI;
evaluation; the errors a user meets first, and the one for transformers missing."""
import json
import os
import shutil
import sys

import pytest
import torch
import yaml

import calm_fast
from calm_fast import hf_clip
from calm_fast._open_clip import import_transformers
from calm_fast.checkpoint import LazyStateDict, read_checkpoint
from calm_fast.cli import main
from calm_fast.clip_tasks import CLIPTasks

import task_vectors_fixtures as tvf

TASKS = {"alpha": 3, "beta": 4}
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]
PROMPTS = {t: {"classes": [str(c) for c in range(n)], "templates": TEMPLATES} for t, n in TASKS.items()}
NO_KERNELS = {"use_kernels": False}  # from_pretrained would want the `kernels` package otherwise


def tiny_config(tf, vision_width: int = 32):
    text = {"vocab_size": 514, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 512, "eos_token_id": 513,
            "pad_token_id": 513}
    vision = {"image_size": 32, "patch_size": 16, "hidden_size": vision_width, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    return tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_tokenizer(tf):
    """A byte-level CLIP BPE over single bytes (no merges): every text tokenizes, ids < 514."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return tf.CLIPTokenizer(vocab=vocab, merges=[])


def perturbed(model, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def vision_of(tf, clip, seed: int):
    """A fine-tuned CLIPVisionModel: the CLIP's image tower, perturbed."""
    vision = tf.CLIPVisionModel(clip.config.vision_config).eval()
    vision.load_state_dict({k[len("vision_model."):]: v for k, v in clip.state_dict().items()
                            if k.startswith("vision_model.")})
    return perturbed(vision, seed)


def write_fusionbench(folder, tasks=TASKS, *, images=None, vision_width=32):
    """<folder>/_pretrained_ (CLIPModel + tokenizer + preprocessor) and <folder>/<task> per task:
    the first task as transformers 5 saves a CLIPVisionModel, the second with transformers 4's
    "vision_model." names, a third (if any) as pytorch_model.bin."""
    from safetensors.torch import save_file

    tf = import_transformers()
    torch.manual_seed(0)
    clip = tf.CLIPModel(tiny_config(tf, vision_width)).eval()
    clip.save_pretrained(folder / "_pretrained_")
    tiny_tokenizer(tf).save_pretrained(folder / "_pretrained_")
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "_pretrained_")
    tuned = {}
    for i, (task, classes) in enumerate(tasks.items()):
        vision = vision_of(tf, clip, i + 1)
        out = folder / task
        if i == 0:
            vision.save_pretrained(out)
        else:
            out.mkdir(parents=True)
            vision.config.save_pretrained(out)
            state = {f"vision_model.{k}": v.contiguous() for k, v in vision.state_dict().items()}
            if i == 1:
                save_file(state, out / "model.safetensors", metadata={"format": "pt"})
            else:
                torch.save(state, out / "pytorch_model.bin")
        tuned[task] = vision
        if images is not None:
            tvf.write_images(images / task, classes, 6, seed=i)
    return clip, tuned


@pytest.fixture(scope="module")
def fusionbench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusionbench")
    root, images = folder / "clip-tiny", folder / "images"
    clip, tuned = write_fusionbench(root, {**TASKS, "gamma": 2}, images=images)
    (folder / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS))
    return root, images, folder / "prompts.yaml", clip, tuned


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_folders_read_exactly_in_every_saved_layout(fusionbench):
    root, _, _, clip, tuned = fusionbench
    base = hf_clip.read_folder(str(root / "_pretrained_"), "pretrained")
    assert isinstance(base.state, LazyStateDict) and base.has_text_tower and base.model_type == "clip"
    want = clip.state_dict()
    assert set(base.state) == set(want) and all(torch.equal(base.state[k], want[k]) for k in want)
    assert set(base.visual()) == {k for k in want if k.startswith("vision_model.")}
    for task, vision in tuned.items():  # v5 names, v4 names, pytorch_model.bin (through safe_pickle)
        folder = hf_clip.read_folder(str(root / task), task)
        own = vision.state_dict()
        assert set(folder.visual()) == {f"vision_model.{k}" for k in own}
        assert all(torch.equal(folder.visual()[f"vision_model.{k}"], v) for k, v in own.items())
        assert not folder.has_text_tower
    assert isinstance(hf_clip.read_folder(str(root / "alpha"), "alpha").state, LazyStateDict)


def test_features_and_zero_shot_heads_match_transformers(fusionbench, tmp_path, monkeypatch):
    root, images, _, _, _ = fusionbench
    tf = import_transformers()
    clip = tf.CLIPModel.from_pretrained(str(root / "_pretrained_"), **NO_KERNELS).eval()
    tokenizer = tf.CLIPTokenizer.from_pretrained(str(root / "_pretrained_"))
    classes = PROMPTS["alpha"]["classes"]
    with torch.no_grad():  # the CLIP recipe, as FusionBench computes it
        rows = []
        for name in classes:
            tokens = tokenizer([t.format(name) for t in TEMPLATES], padding=True, return_tensors="pt")
            e = clip.get_text_features(**tokens)
            e = getattr(e, "pooler_output", e)  # a tensor, or an output object in newer transformers
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(e / e.norm())
        want = torch.stack(rows) * clip.logit_scale.exp()
    jobs = dict(zeroshot={"alpha": PROMPTS["alpha"]}, heads_cache=str(tmp_path / "cache"))
    job = CLIPTasks(str(root), ["alpha"], str(images), **jobs)
    assert type(job.layout).__name__ == "HFLayout" and job.model == "clip-tiny"
    head = job.heads()["alpha"]
    assert head.normalize and torch.allclose(head.weight, want, rtol=1e-5, atol=1e-5)
    cached = os.listdir(tmp_path / "cache" / "clip-tiny")
    assert len(cached) == 1 and cached[0].startswith("alpha-") and cached[0].endswith(".safetensors")
    monkeypatch.setattr(calm_fast.heads, "zero_shot_head", lambda *a, **k: pytest.fail("cache not used"))
    again = CLIPTasks(str(root), ["alpha"], str(images), **jobs).heads()
    assert torch.equal(again["alpha"].weight, head.weight)

    model = job.architecture()  # features: visual_projection(pooler_output) of the pretrained tower
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        got = job.layout.encode(model)(pixels)
        direct = clip.get_image_features(pixel_values=pixels)
        direct = getattr(direct, "pooler_output", direct)
    assert torch.allclose(got, direct, rtol=1e-5, atol=1e-6)
    image = tvf_image(images / "alpha")
    preprocess = tf.CLIPImageProcessor.from_pretrained(str(root / "_pretrained_"))
    assert torch.equal(job.layout.transform(model)(image), preprocess(images=image, return_tensors="pt")["pixel_values"][0])


def tvf_image(folder):
    from PIL import Image

    first = sorted(p for p in folder.rglob("*.png"))[0]
    with Image.open(first) as image:
        return image.convert("RGB")


def test_the_one_command_merges_writes_a_loadable_model_and_evaluates(fusionbench, tmp_path, capsys, monkeypatch):
    root, images, prompts, _, _ = fusionbench
    tf = import_transformers()
    monkeypatch.chdir(tmp_path)
    tasks = ",".join(TASKS)
    common = ["--task-vectors", root, "--tasks", tasks, "--zeroshot", prompts, "--heads-cache", tmp_path / "heads",
              "--device", "cpu", "-q"]
    code, _, err = _cli(capsys, "merge", *common, "--data", images, "--option", "updates=2", "--option",
                        "batch_size=8", "--option", "sequential=[beta]", "--workers", "2")
    assert code == 0, err
    out = tmp_path / "merged-calm"
    assert sorted(os.listdir(out)) == ["config.json", "masks.safetensors", "model.safetensors",
                                       "preprocessor_config.json", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "calm" and report["report"]["sequential"] == ["beta"]
    merged = read_checkpoint(str(out))
    base = hf_clip.read_folder(str(root / "_pretrained_"), "pretrained")
    assert set(merged) == set(base.visual())
    loaded = tf.CLIPVisionModel.from_pretrained(str(out), **NO_KERNELS)  # the output is a CLIPVisionModel folder
    assert all(torch.equal(v, merged[f"vision_model.{k}"]) for k, v in loaded.state_dict().items())
    assert len(loaded.state_dict()) == len(merged)

    code, _, err = _cli(capsys, "merge", *common, "--method", "ties", "--output", "ties")
    assert code == 0, err
    _, tuned = CLIPTasks(str(root), list(TASKS)).weights()
    want = calm_fast.merge(base.visual(), tuned, method="ties", device="cpu", progress=False).state_dict
    got = read_checkpoint(str(tmp_path / "ties"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    code, out_text, err = _cli(capsys, "evaluate", *common, "--data", images,
                               "--weights", "zeroshot", "finetuned", "merged-calm", root / "beta", "--json")
    assert code == 0, err
    table = json.loads(out_text)
    assert set(table) == {"zeroshot", "finetuned", "merged-calm", str(root / "beta")}
    assert all(set(row) == {"alpha", "beta", "mean"} and 0 <= row["mean"] <= 1 for row in table.values())


def test_config_form_with_explicit_folders_agrees_with_the_root(fusionbench, tmp_path, capsys):
    root, images, prompts, _, _ = fusionbench
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "method": "task_arithmetic", "output": "explicit", "device": "cpu",
        "task_vectors": {"pretrained": str(root / "_pretrained_"), "tasks": ["beta", "gamma"],
                         "finetuned": {"beta": str(root / "beta"), "gamma": str(root / "gamma")}}}))
    code, _, err = _cli(capsys, "merge", tmp_path / "job.yaml", "-q")
    assert code == 0, err
    code, _, err = _cli(capsys, "merge", "--task-vectors", root, "--tasks", "beta,gamma", "--method",
                        "task_arithmetic", "--output", tmp_path / "from-root", "-q")
    assert code == 0, err
    a, b = read_checkpoint(str(tmp_path / "explicit")), read_checkpoint(str(tmp_path / "from-root"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "explicit" / "config.json").read_text())["model_type"] == "clip_vision_model"


def test_errors_name_the_task_folder_and_extra(fusionbench, tmp_path, capsys, monkeypatch):
    root, images, prompts, _, _ = fusionbench
    shutil.copytree(root, tmp_path / "root")
    shutil.copytree(images, tmp_path / "images")
    root, images = tmp_path / "root", tmp_path / "images"

    def fails(*args, tasks=",".join(TASKS)):
        code, _, err = _cli(capsys, "merge", "--task-vectors", root, "--tasks", tasks, "--data", images,
                            "--zeroshot", prompts, "--heads-cache", tmp_path / "heads", "--output", tmp_path / "out",
                            "--device", "cpu", "-q", *args)
        assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
        return err

    assert "task 'delta': no folder" in fails(tasks="alpha,delta")
    only_alpha = tmp_path / "alpha.yaml"
    only_alpha.write_text(yaml.safe_dump({"alpha": PROMPTS["alpha"]}))
    assert "task 'gamma': no head: no zero-shot class names" in fails("--zeroshot", only_alpha, tasks="alpha,gamma")
    assert "leave --model out" in fails("--model", "ViT-B-32")

    two = tmp_path / "two.yaml"  # a 2-class head for alpha's 3 class folders
    two.write_text(yaml.safe_dump({**PROMPTS, "alpha": {"classes": ["0", "1"], "templates": TEMPLATES}}))
    err = fails("--zeroshot", two)
    assert "task 'alpha'" in err and "class folder(s) ['2']" in err and "2 class names" in err

    wide = tmp_path / "wide"  # a fine-tuned CLIPVisionModel of another width in the same root
    write_fusionbench(wide, {"alpha": 3}, vision_width=48)
    shutil.rmtree(root / "alpha")
    shutil.copytree(wide / "alpha", root / "alpha")
    err = fails("--method", "task_arithmetic")
    assert "mixed architectures? task 'alpha'" in err and "hidden_size" in err

    vision_only = tmp_path / "vision-only"  # a CLIPVisionModel as the pretrained: needs --text-tower
    shutil.copytree(root / "beta", vision_only / "_pretrained_")
    for task in TASKS:
        shutil.copytree(root / "beta", vision_only / task)
    code, _, err = _cli(capsys, "merge", "--task-vectors", vision_only, "--tasks", ",".join(TASKS), "--data", images,
                        "--zeroshot", prompts, "--heads-cache", tmp_path / "heads", "--output", tmp_path / "out",
                        "--device", "cpu", "-q")
    assert code == 2 and "--text-tower" in err and "visual_projection" in err
    code, _, err = _cli(capsys, "merge", "--task-vectors", vision_only, "--tasks", ",".join(TASKS), "--data", images,
                        "--zeroshot", prompts, "--heads-cache", tmp_path / "heads", "--output", tmp_path / "out",
                        "--text-tower", root / "_pretrained_", "--option", "updates=1", "--device", "cpu", "-q")
    assert code == 0, err  # the CLIPModel folder gives the projection and the text tower
    shutil.rmtree(tmp_path / "out")

    monkeypatch.setitem(sys.modules, "transformers", None)  # transformers not installed
    err = fails("--method", "task_arithmetic", tasks="beta")
    assert "transformers" in err and "calm_fast[hf]" in err
