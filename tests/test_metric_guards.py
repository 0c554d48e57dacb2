"""Metrics that mean what they say: fd_pixels refused above its dimension cap, guidance refused without a trained
null label (each in one line, exit 2 at the command line)."""
from __future__ import annotations

import pytest

from pipeline.errors import FlowrailError
from pipeline.sweep.metric import FD_PIXELS_MAX_DIM, check_fd_pixels, check_fd_pixels_shards


def test_fd_pixels_is_refused_above_its_dimension_cap():
    check_fd_pixels("pixels", 1, 16)  # digits: 256 dimensions
    check_fd_pixels("pixels", 1, 64)  # exactly the cap
    assert 64 * 64 == FD_PIXELS_MAX_DIM
    with pytest.raises(FlowrailError) as err:
        check_fd_pixels("pixels", 3, 256)  # the 256^2 RGB: 196,608 dimensions
    msg = str(err.value)
    assert "\n" not in msg and "fd_pixels" in msg and "196,608" in msg and "fd_digits" in msg and "fid" in msg
    with pytest.raises(FlowrailError, match="3x256x256"):
        check_fd_pixels("latents", 4, 32)  # a latent set decodes to 256^2 RGB images


def test_fd_pixels_is_refused_from_the_shard_set_before_work_starts(digits_shards):
    check_fd_pixels_shards(str(digits_shards / "val"), 16)
    with pytest.raises(FlowrailError, match=r"1x128x128 images has 16,384 dimensions"):
        check_fd_pixels_shards(str(digits_shards / "val"), 128)


def test_a_sweep_scoring_oversize_fd_pixels_exits_2_before_any_trial(digits_shards, tmp_path, capsys):
    from jobs.cli import main

    argv = ["sweep", "sweep", f"overrides.data.shards={digits_shards / 'train'}",
            f"overrides.data.val_shards={digits_shards / 'val'}", "overrides.data.image_size=128",
            f"overrides.run_dir={tmp_path}", "eval.metrics=[fd_pixels]", "tune.metric=fd_pixels"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fd_pixels" in err and "16,384" in err, err
    assert not (tmp_path / "sweeps").exists()  # nothing started


@pytest.mark.parametrize("model", ["sit", "dfm"])
def test_guidance_without_a_trained_null_label_is_refused(model):
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.objective import validate_settings

    def cfg(*extra: str) -> TrainJobConfig:
        return load_config(TrainJobConfig, None, [f"model.name={model}", *extra])

    validate_settings(cfg("guidance.scale=4"))  # the null label was trained (class_dropout_prob 0.1)
    validate_settings(cfg("model.class_dropout_prob=0"))  # no guidance: nothing to refuse
    with pytest.raises(ValueError) as err:
        validate_settings(cfg("guidance.scale=4", "model.class_dropout_prob=0"))
    msg = str(err.value)
    assert "\n" not in msg and "guidance.scale=4.0" in msg and "class_dropout_prob=0" in msg


def test_guidance_without_a_null_label_exits_2(capsys, tmp_path):
    from jobs.cli import main

    assert main(["train", "guidance.scale=4", "model.class_dropout_prob=0", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "guidance.scale=4.0" in err and "null label" in err, err
