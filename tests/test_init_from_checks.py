"""``init_from`` compares what a checkpoint was trained as with the config: path, prediction, learn_sigma and class
count differences are refused in one line unless ``init_from_override=true``; import notes are returned (printed
and logged by the trainer); label tables without a null row import cleanly."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainJobConfig, load_config
from pipeline.errors import CheckpointError
from pipeline.models.checkpoint_import import load_official_checkpoint
from pipeline.train.init_from import check_init_from, checkpoint_facts, initialise_from
from test_models_checkpoint import random_state, small_layout, small_model


def _official(tmp_path: Path, name: str, num_classes: int = 10, null_row: bool = True, **args) -> Path:
    layout = small_layout(num_classes=num_classes)
    if not null_row:
        layout["y_embedder.embedding_table.weight"] = (num_classes, 32)
    state = random_state(layout)
    path = tmp_path / name
    args = {"path_type": "Linear", "prediction": "velocity", **args}  # what SiT's training checkpoints record
    torch.save({"ema": state, "model": state, "args": argparse.Namespace(num_classes=num_classes, **args)}, path)
    return path


def _cfg(init_from: Path, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, [f"init_from={init_from}", "model.learn_sigma=true", "data.image_size=8", *overrides])


def test_checkpoint_facts_read_the_official_args(tmp_path):
    facts = checkpoint_facts(str(_official(tmp_path, "gvp.pt", path_type="GVP", prediction="score")))
    assert (facts.path, facts.prediction, facts.learn_sigma, facts.num_classes, facts.null_row) == \
        ("gvp", "score", True, 10, True)


@pytest.mark.parametrize("args,overrides,expected", [
    ({"path_type": "GVP"}, [], "transport.path=linear but the checkpoint was trained on path gvp"),
    ({"prediction": "score"}, [], "transport.prediction=velocity but the checkpoint predicts score"),
    ({}, ["model.learn_sigma=false"], "model.learn_sigma=false but the checkpoint has learn_sigma=true"),
])
def test_a_differently_trained_checkpoint_is_refused_unless_overridden(tmp_path, args, overrides, expected):
    ckpt = _official(tmp_path, "ckpt.pt", **args)
    with pytest.raises(CheckpointError) as err:
        check_init_from(_cfg(ckpt, *overrides), num_classes=10)
    message = str(err.value)
    assert expected in message and "init_from_override=true" in message and "\n" not in message
    notes = check_init_from(_cfg(ckpt, *overrides, "init_from_override=true"), num_classes=10)
    assert any(expected in n for n in notes)
    # matching the config to the checkpoint is accepted with nothing to note
    fixed = [f"transport.path={args['path_type'].lower()}"] if "path_type" in args else []
    fixed += [f"transport.prediction={args['prediction']}"] if "prediction" in args else []
    if not overrides:
        assert check_init_from(_cfg(ckpt, *fixed), num_classes=10) == []


def test_class_count_mismatch_is_refused_then_reinitialised_with_override(tmp_path):
    ckpt = _official(tmp_path, "imagenet.pt", num_classes=1000)
    with pytest.raises(CheckpointError, match="the data have 10 classes but the checkpoint has 1000"):
        check_init_from(_cfg(ckpt), num_classes=10)
    model = small_model()
    loaded = initialise_from(model, str(ckpt), override=True)
    assert "class embeddings re-initialised" in loaded


def test_a_table_without_null_row_imports_cleanly(tmp_path):
    """A checkpoint trained without class dropout (num_classes rows) is not a class-count mismatch."""
    ckpt = _official(tmp_path, "nonull.pt", num_classes=10, null_row=False)
    notes = check_init_from(_cfg(ckpt), num_classes=10)
    assert any("no null row" in n for n in notes)
    state = torch.load(ckpt, weights_only=False)["ema"]
    model = small_model()
    report = load_official_checkpoint(ckpt, model)
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(table[:10], state["y_embedder.embedding_table.weight"])
    assert any("no null-label row" in n for n in report.notes)
    # without args the table's size alone is consistent with 10 classes (no null row) or 9 (+ null)
    torch.save(state, tmp_path / "bare.pt")
    declared = ("init_from_path=linear", "init_from_prediction=velocity")  # a bare dict does not say them
    assert check_init_from(_cfg(tmp_path / "bare.pt", *declared), num_classes=10) == []
    with pytest.raises(CheckpointError, match="label table has 10 rows"):
        check_init_from(_cfg(tmp_path / "bare.pt", *declared), num_classes=7)


# ---------------------------------------------------------------- bare state dicts (issue 32)

def _bare(tmp_path: Path, learn_sigma: bool = True) -> Path:
    """A bare (EMA) state dict, like SiT's released SiT-XL-2-256x256.pt: no args, no path, no prediction."""
    path = tmp_path / "bare.pt"
    torch.save(random_state(small_layout(out_ch=8 if learn_sigma else 4)), path)
    return path


def test_a_bare_state_dict_must_be_declared(tmp_path):
    bare = _bare(tmp_path)
    with pytest.raises(CheckpointError) as err:
        check_init_from(_cfg(bare), num_classes=10)
    msg = str(err.value)
    assert "\n" not in msg and "a bare state dict does not say how it was trained" in msg
    assert "init_from_path=..." in msg and "init_from_prediction=..." in msg and "learn_sigma=true" in msg
    # declared: accepted; learn_sigma is inferred from the shapes (a model without it is a mismatch)
    declared = ("init_from_path=linear", "init_from_prediction=velocity")
    assert check_init_from(_cfg(bare, *declared), num_classes=10) == []
    with pytest.raises(CheckpointError, match="model.learn_sigma=false but the checkpoint has learn_sigma=true"):
        check_init_from(_cfg(bare, *declared, "model.learn_sigma=false"), num_classes=10)
    (tmp_path / "plain").mkdir()
    assert checkpoint_facts(str(_bare(tmp_path / "plain", learn_sigma=False)), "linear", "velocity").learn_sigma is False


def test_a_score_trained_bare_dict_does_not_load_into_a_velocity_config(tmp_path):
    bare = _bare(tmp_path)
    with pytest.raises(CheckpointError, match="transport.prediction=velocity but the checkpoint predicts score"):
        check_init_from(_cfg(bare, "init_from_path=linear", "init_from_prediction=score"), num_classes=10)


def test_a_declaration_contradicting_the_file_is_refused(tmp_path):
    ckpt = _official(tmp_path, "gvp.pt", path_type="GVP")
    with pytest.raises(CheckpointError, match="init_from_path=linear but the checkpoint itself says gvp"):
        check_init_from(_cfg(ckpt, "init_from_path=linear", "transport.path=gvp"), num_classes=10)


def test_a_declaration_without_init_from_is_refused():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="init_from_prediction=score declares what init_from was trained as"):
        load_config(TrainJobConfig, None, ["init_from_prediction=score"])


def test_an_undeclared_bare_checkpoint_exits_2_before_anything_starts(tmp_path, digits_shards, capsys):
    from jobs.cli import main

    bare = _bare(tmp_path)
    argv = ["train", f"init_from={bare}", "model.learn_sigma=true", f"data.shards={digits_shards / 'train'}",
            f"data.val_shards={digits_shards / 'val'}", "data.image_size=8", "data.verify_checksums=false",
            f"run_dir={tmp_path / 'runs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "init_from_path" in err and str(bare) in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("mlflow_run.json"))


def test_an_object_store_init_from_is_checked_and_fetched_before_the_workers(tmp_path, s3_bucket, monkeypatch):
    import boto3

    monkeypatch.setenv("FLOWRAIL_CACHE", str(tmp_path / "cache"))
    bare = _bare(tmp_path)
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").upload_file(str(bare), bucket, "ckpts/SiT-bare.pt")
    url = f"{s3_bucket}/ckpts/SiT-bare.pt"
    with pytest.raises(CheckpointError, match="a bare state dict does not say how it was trained"):
        check_init_from(_cfg(url), num_classes=10)  # read (not skipped) on the driver
    with pytest.raises(CheckpointError, match="predicts score"):
        check_init_from(_cfg(url, "init_from_path=linear", "init_from_prediction=score"), num_classes=10)
    with pytest.raises(CheckpointError, match=r"init_from=s3://.*/ckpts/missing.pt: no such file"):
        check_init_from(_cfg(f"{s3_bucket}/ckpts/missing.pt"), num_classes=10)
    model = small_model()
    loaded = initialise_from(model, url)  # what each worker does: the cached copy
    assert "official checkpoint" in loaded
    assert torch.equal(model.x_embedder.proj.weight, torch.load(bare, weights_only=True)["x_embedder.proj.weight"])
