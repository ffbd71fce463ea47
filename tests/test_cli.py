"""`calm-fast` end to end on the toy checkpoints of examples/toy_tasks.py, from config files."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import differing_mask_bits
from safetensors.torch import save_file

import calm_fast
from calm_fast import config as config_file
from calm_fast import maskfile
from calm_fast.checkpoint import read_checkpoint
from calm_fast.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    spec = importlib.util.spec_from_file_location("toy_tasks", EXAMPLES / "toy_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_checkpoints(str(folder))
    return folder, module.TASKS


def _config(toy, tmp_path, **fields):
    folder, tasks = toy
    raw = {"method": "calm", "pretrained": str(folder / "pretrained.safetensors"),
           "finetuned": {t: str(folder / f"{t}.safetensors") for t in tasks},
           "options": {"updates": 20, "sequential": ["south", "west"]},
           "factory": f"{EXAMPLES / 'toy_tasks.py'}:factory", "factory_args": {"folder": str(folder)},
           "output": "out/merged", "device": "cpu", "seed": 0}
    raw.update(fields)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def cli(capsys):
    """calm-fast in this process: (exit code, stdout, stderr)."""
    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_merge_replay_inspect_from_a_config_file(cli, toy, tmp_path):
    path = _config(toy, tmp_path)
    code, out, err = cli("merge", path, "--quiet")
    assert code == 0, err
    merged = tmp_path / "out" / "merged"  # relative to the config file's folder
    assert sorted(os.listdir(merged)) == ["masks.safetensors", "model.safetensors", "report.json"]
    assert not (tmp_path / "out" / "merged.progress.safetensors").exists()  # removed once written
    report = json.loads((merged / "report.json").read_text())
    assert report["method"] == "calm" and report["report"]["sequential"] == ["south", "west"]
    assert report["config"]["updates"] == 20

    code, _, err = cli("replay", path, "--output", tmp_path / "replayed.safetensors", "-q")
    assert code == 0, err
    weights, replayed = read_checkpoint(str(merged)), read_checkpoint(str(tmp_path / "replayed.safetensors"))
    assert set(weights) == set(replayed) and all(torch.equal(weights[k], replayed[k]) for k in weights)

    code, out, err = cli("inspect", merged, "--json", "--png", tmp_path / "density.png")
    assert code == 0, err
    table = json.loads(out)
    for task in ("south", "west"):
        expected = report["report"]["mask_density_per_parameter"][task]
        assert {k: row["density"][task] for k, row in table["parameters"].items()} == pytest.approx(expected)
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("inspect", merged / "masks.safetensors")
    assert code == 0 and "all masked parameters" in out and "0.weight" in out

    code, _, err = cli("merge", path, "-q")
    assert code == 2 and "exists" in err  # refuses to overwrite before doing the work


def test_data_free_merge_writes_shards_equal_to_the_python_api(cli, toy, tmp_path):
    folder, tasks = toy
    path = _config(toy, tmp_path, method="ties", options={"density": 0.3}, factory=None, factory_args=None,
                   shard_size="8KB")
    code, _, err = cli("merge", path, "-q")
    assert code == 0, err
    merged = tmp_path / "out" / "merged"
    files = os.listdir(merged)
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-") for f in files) >= 2
    expected = calm_fast.merge(str(folder / "pretrained.safetensors"),
                               {t: str(folder / f"{t}.safetensors") for t in tasks}, method="ties",
                               config=calm_fast.DataFreeConfig(density=0.3), device="cpu", progress=False)
    written = read_checkpoint(str(merged))
    assert all(torch.equal(written[k], v) for k, v in expected.state_dict.items())


@pytest.mark.parametrize("given, parsed", [("auto", "auto"), ("trial", "trial"), (1, 1.0), (0.5, 0.5)])
def test_init_scaling_is_a_number_auto_or_trial(toy, tmp_path, given, parsed):
    path = _config(toy, tmp_path, options={"init_scaling": given})
    assert config_file.load(str(path)).options.init_scaling == parsed


@pytest.mark.parametrize("fields, message", [
    ({"method": "magic"}, "field 'method': must be one of"),
    ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ({"output": None}, "field 'output' is required"),
    ({"options": {"updates": "many"}}, "field 'options.updates': must be an integer"),
    ({"options": {"step": "sideways"}}, "CALMConfig.step must be one of"),
    ({"options": {"init_scaling": "best"}}, r"CALMConfig.init_scaling must be > 0 or one of \('auto', 'trial'\)"),
    ({"options": {"init_scaling": True}}, "field 'options.init_scaling': must be a number"),
    ({"options": {"lr_scale": 2}}, r"\['lr_scale'\] are not options of method 'calm'"),
    ({"options": {"delta_dtype": "int8"}}, "field 'options.delta_dtype': must be one of"),
    ({"factory": None}, "field 'factory' is required for method 'calm'"),
    ({"factory": "no_colon"}, "field 'factory': must be"),
    ({"device": "tpu"}, "field 'device': must be auto, cpu, cuda or cuda:N"),
    ({"shard_size": "huge"}, "field 'shard_size': must be a size"),
    ({"resume": "yes"}, "field 'resume': must be true or false"),
    ({"finetuned": {}}, "field 'finetuned': must be a non-empty mapping"),
    ({"pretrained": {"open_clip": 3}}, "field 'pretrained': must be a path or {open_clip"),
])
def test_config_errors_name_the_field(cli, toy, tmp_path, fields, message):
    path = _config(toy, tmp_path, **fields)
    with pytest.raises(config_file.ConfigError, match=message):
        config_file.load(str(path))
    code, _, err = cli("merge", path, "-q")
    assert code == 2 and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_broken_checkpoint_fails_cleanly_and_writes_nothing(cli, toy, tmp_path):
    folder, tasks = toy
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((folder / "east.safetensors").read_bytes()[:-9])
    path = _config(toy, tmp_path, finetuned={t: str(cut if t == "east" else folder / f"{t}.safetensors")
                                             for t in tasks})
    code, _, err = cli("merge", path, "-q")
    assert code == 2 and "cut.safetensors is not a readable safetensors file" in err
    assert not (tmp_path / "out").exists()


def _help(*args):
    run = subprocess.run([sys.executable, "-m", "calm_fast.cli", *args, "--help"], capture_output=True,
                         text=True, timeout=120)
    return run.returncode, run.stdout


def test_every_command_has_complete_help():
    code, out = _help()
    assert code == 0 and all(c in out for c in ("merge", "replay", "inspect", "info", "bench"))
    for command, flags in (("merge", ("--device", "--overwrite", "--quiet")),
                           ("replay", ("--masks", "--output", "--device")),
                           ("inspect", ("--png", "--json")),
                           ("info", ("--json",)),
                           ("bench", ("--quick", "--sizes", "--ops", "--device"))):
        code, out = _help(command)
        assert code == 0 and all(f in out for f in flags), (command, out)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(example):
    job = config_file.load(str(example))
    assert job.output.startswith(str(EXAMPLES))


def test_an_interrupted_merge_resumes_from_its_progress_file(cli, toy, tmp_path, monkeypatch):
    from calm_fast.calm import CALMMerger

    path = _config(toy, tmp_path, options={"updates": 5, "sequential": ["east", "south", "west"]})
    code, _, err = cli("merge", path, "-q")
    assert code == 0, err
    uninterrupted = read_checkpoint(str(tmp_path / "out" / "merged"))
    uninterrupted = {k: uninterrupted[k] for k in uninterrupted}
    path = _config(toy, tmp_path, options={"updates": 5, "sequential": ["east", "south", "west"]},
                   output="again/merged")
    original, steps, crashed = CALMMerger.optimize_step, [], []

    def crash_on_second_step(self, task, seen):
        steps.append(task)
        if len(steps) == 2 and not crashed:
            crashed.append(task)
            raise RuntimeError("power cut")
        return original(self, task, seen)

    monkeypatch.setattr(CALMMerger, "optimize_step", crash_on_second_step)
    with pytest.raises(RuntimeError, match="power cut"):
        cli("merge", path, "-q")
    assert (tmp_path / "again" / "merged.progress.safetensors").exists()
    assert not (tmp_path / "again" / "merged").exists()
    steps.clear()
    code, _, err = cli("merge", path, "-q")
    assert code == 0, err
    assert steps == ["south", "west"]  # east was finished before the interruption
    resumed = read_checkpoint(str(tmp_path / "again" / "merged"))
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    assert not (tmp_path / "again" / "merged.progress.safetensors").exists()


def test_check_validates_everything_and_writes_nothing(cli, toy, tmp_path):
    folder, tasks = toy
    code, out, err = cli("merge", _config(toy, tmp_path), "--check", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert sorted(summary["tasks"]) == sorted(tasks) and summary["merged_parameters"] == 4
    assert summary["merged_scalars"] == 16 * 64 + 64 + 64 * 64 + 64 and not (tmp_path / "out").exists()
    bad = tmp_path / "nan.safetensors"
    state = {k: v.clone() for k, v in read_checkpoint(str(folder / "west.safetensors")).items()}
    state["2.weight"][5, 5] = float("nan")
    save_file(state, str(bad))
    path = _config(toy, tmp_path, finetuned={t: str(bad if t == "west" else folder / f"{t}.safetensors")
                                             for t in tasks})
    code, _, err = cli("merge", path, "--check", "-q")
    assert code == 2 and "task 'west': 2.weight holds NaN or Inf" in err
    path = _config(toy, tmp_path, factory_args={"folder": str(folder), "missing": 1})
    code, _, err = cli("merge", path, "--check", "-q")
    assert code == 2 and "unexpected keyword argument 'missing'" in err


def test_info_reports_the_build_in_use(cli):
    from calm_fast import _extension

    code, out, _ = cli("info", "--json")
    info = json.loads(out)
    assert code == 0 and info["calm_fast"] == calm_fast.__version__ and info["torch"] == torch.__version__
    assert info["native"] is _extension.NATIVE and info["cpu_isa"] == _extension.CPU_ISA
    assert info["backend"]["cpu"] == ("native" if _extension.NATIVE else "reference")
    run = subprocess.run([sys.executable, "-m", "calm_fast.cli", "info", "--json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CALM_FAST_CPU_ISA": "default"})
    forced = json.loads(run.stdout)
    assert forced["cpu_isa"] == ("default" if _extension.NATIVE else None), run.stderr


def _torchrun(path, tmp_path):
    """`calm-fast merge` under `torchrun --nproc-per-node 2` (gloo, a free port through --standalone, 1 thread a rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CALM_FAST_DIST_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "calm_fast.cli", "merge", str(path), "-q"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("method, options", [("ties", {"density": 0.3}), ("consensus", {"min_votes": 2})])
def test_data_free_merge_under_torchrun_equals_one_process(toy, tmp_path, method, options):
    """Two ranks, each writing the shards of its keys: the same tensors as one process writes."""
    folder, tasks = toy
    path = _config(toy, tmp_path, method=method, options=options, factory=None, factory_args=None,
                   shard_size="8KB")
    run = _torchrun(path, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    expected = calm_fast.merge(str(folder / "pretrained.safetensors"),
                               {t: str(folder / f"{t}.safetensors") for t in tasks}, method=method,
                               config=calm_fast.DataFreeConfig(**options), device="cpu", progress=False)
    written = read_checkpoint(str(tmp_path / "out" / "merged"))
    assert sorted(written.keys()) == sorted(expected.state_dict)
    assert all(torch.equal(written[k], v) for k, v in expected.state_dict.items())


def test_calm_under_torchrun_writes_what_one_process_writes(cli, toy, tmp_path):
    """Two ranks on the model sharded by FSDP2: the same files, order and masks as one process."""
    (tmp_path / "one").mkdir()
    code, _, err = cli("merge", _config(toy, tmp_path / "one"), "--quiet")
    assert code == 0, err
    run = _torchrun(_config(toy, tmp_path), tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    one, two = (folder / "out" / "merged" for folder in (tmp_path / "one", tmp_path))
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert not list((tmp_path / "out").glob("*.progress.safetensors"))  # removed once the merge is written
    reports = [json.loads((folder / "report.json").read_text())["report"] for folder in (one, two)]
    assert reports[1]["sequential"] == reports[0]["sequential"] == ["south", "west"]
    assert reports[1]["pseudo_labels"] == reports[0]["pseudo_labels"]
    masks = [maskfile.read(str(folder / "masks.safetensors"))[0] for folder in (one, two)]
    differing, total = differing_mask_bits(*masks)
    print(f"{differing} of {total} mask bits differ")
    assert differing <= 1e-3 * total, (differing, total)
