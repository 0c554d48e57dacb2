"""Configuration: YAML + dotted overrides; one-line errors with exit code 2."""
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, TrainJobConfig, load_config, parse_overrides


def test_overrides_are_typed_and_nested():
    cfg = load_config(TrainJobConfig, "train", ["model.depth=3", "train.zero_stage=3", "model=SiT-S/2",
                                                 "train.betas=[0.8, 0.9]", "transport.path=gvp"])
    assert cfg.model.depth == 3 and cfg.train.zero_stage == 3 and cfg.model.name == "SiT-S/2"
    assert cfg.train.betas == (0.8, 0.9) and cfg.transport.path == "gvp"
    assert cfg.run_dir.startswith("/") and cfg.data.shards.startswith("/")
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override, needle", [
    ("train.zero_stag=3", "unknown key 'train.zero_stag'"),
    ("train.zero_stage=5", "train.zero_stage=5"),
    ("transport.path=straight", "transport.path='straight'"),
    ("model.depth=deep", "model.depth='deep'"),
    ("nonsense", "not of the form key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, "train", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed here: .*zero_stage"):
        load_config(TrainJobConfig, "train", ["train.zero_stag=3"])


def test_cli_bad_key_exit_code_2_one_line():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "train.zero_stag=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.zero_stag" in lines[0] and "Traceback" not in proc.stderr


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainJobConfig, "/nonexistent/x.yaml")
