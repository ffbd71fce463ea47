"""The merge-method registry (calm_fast/methods/): what every method declares, and that merge(),
check() and the YAML config reach a method only through it, so that a new method is one module
and one entry in methods.METHODS."""
import dataclasses
import inspect

import pytest
import torch

import calm_fast
from calm_fast import config as config_file
from calm_fast import methods
from calm_fast.methods import Merged, MergeMethod


def test_every_method_declares_its_contract():
    assert list(methods.METHODS) == list(calm_fast.METHODS) == ["calm", "average", "task_arithmetic", "ties",
                                                                 "consensus"]
    for name, method in methods.METHODS.items():
        assert method.name == name and method.summary
        assert dataclasses.is_dataclass(method.config_class)
        assert list(inspect.signature(method.validate).parameters) == ["config", "num_tasks"]
        assert type(method).run is not MergeMethod.run, name
        method.validate(method.config(), 2)  # the defaults are valid
    assert [n for n, m in methods.METHODS.items() if m.needs_data] == ["calm"]
    assert methods.DATA_FREE == ("average", "task_arithmetic", "ties", "consensus")


def test_unknown_method_and_wrong_config_class():
    with pytest.raises(ValueError, match=r"unknown method 'dare'; one of \('calm', 'average'"):
        methods.get("dare")
    with pytest.raises(TypeError, match="method 'ties' takes a DataFreeConfig, got CALMConfig"):
        methods.get("ties").config(calm_fast.CALMConfig())


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    factor: float = 2.0


class ScaleFirstTask(MergeMethod):
    """A method the library does not have: θ0 + factor · τ of the first task."""

    name = "scale_first"
    config_class = ScaleConfig
    summary = "θ0 + factor · τ1"

    def validate(self, config, num_tasks):
        if config.factor <= 0:
            raise ValueError(f"calm_fast: factor must be > 0, got {config.factor}")

    def run(self, inputs, config):
        first = next(iter(inputs.tuned.values()))
        return Merged({k: inputs.base[k] + config.factor * (first[k] - inputs.base[k]) for k in inputs.keys})


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "scale_first", ScaleFirstTask())


def test_a_registered_method_runs_through_merge_check_and_the_config(registered, tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=gen), "steps": torch.tensor(3)}
    tuned = {t: {"w": base["w"] + torch.randn(4, 3, generator=gen), "steps": torch.tensor(3)} for t in ("a", "b")}
    result = calm_fast.merge(base, tuned, method="scale_first", config=ScaleConfig(0.5), progress=False)
    torch.testing.assert_close(result.state_dict["w"], base["w"] + 0.5 * (tuned["a"]["w"] - base["w"]))
    assert torch.equal(result.state_dict["steps"], base["steps"])  # carried, as for every method
    assert calm_fast.check(base, tuned, method="scale_first")["merged_parameters"] == 1
    with pytest.raises(ValueError, match="factor must be > 0"):
        calm_fast.merge(base, tuned, method="scale_first", config=ScaleConfig(-1.0), progress=False)
    job = config_file.parse({"method": "scale_first", "pretrained": "p.safetensors", "output": "out",
                             "finetuned": {"a": "a.safetensors"}, "options": {"factor": 3}}, str(tmp_path))
    assert job.options == ScaleConfig(3.0) and job.progress_file is None
    with pytest.raises(config_file.ConfigError, match=r"\['lr'\] are not options of method 'scale_first'"):
        config_file.parse({"method": "scale_first", "pretrained": "p", "output": "o", "finetuned": {"a": "a"},
                           "options": {"lr": 1}}, str(tmp_path))
