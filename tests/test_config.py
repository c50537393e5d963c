"""Typed configs: YAML, then key=value overrides; one-line errors naming the key."""

from dataclasses import dataclass, field

import pytest

from latentgen.config import load_config
from latentgen.data import DataConfig
from latentgen.errors import UserError


@dataclass
class Job:
    max_steps: int = 10
    learning_rate: float = 1e-4
    output_dir: str = "out"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 5\ndata:\n  source: shapes\n  resolution: 32\nmodel:\n  block_out_channels: [32, 64]\n")
    job = load_config(Job, path, ["max_steps=7", "data.resolution=48", "learning_rate=3e-4"])
    assert job.max_steps == 7 and job.data.resolution == 48 and job.learning_rate == 3e-4
    assert job.model == {"block_out_channels": [32, 64]} and isinstance(job.data, DataConfig)


@pytest.mark.parametrize("text, overrides, message", [
    ("max_step: 5\n", [], "unknown config key 'max_step'; did you mean 'max_steps'?"),
    ("data:\n  resolutoin: 32\n", [], "unknown config key 'data.resolutoin'; did you mean 'data.resolution'?"),
    ("", ["data.sourc=hf"], "command line: unknown config key 'data.sourc'; did you mean 'data.source'?"),
    ("max_steps: many\n", [], "config key 'max_steps'"),
    ("", ["max_steps"], "override 'max_steps' is not of the form key=value"),
    ("data: 3\n", [], "'data' must be a mapping"),
    ("data:\n  source: web\n", [], "unknown data source 'web'"),
    ("", ["max_steps=[1, 2]", "max_steps={a: 1}"], "cannot apply the overrides at key 'max_steps'"),
])
def test_bad_configs_are_one_line(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(Job, path, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.yaml does not exist"):
        load_config(Job, tmp_path / "nope.yaml")
