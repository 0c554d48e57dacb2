"""Settings of the ZeRO path: shipped DeepSpeed presets, EMA device, resume world size; bad input named in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig, TrainJobConfig, load_config
from pipeline.errors import CheckpointError, FlowrailError
from pipeline.train.engine import deepspeed_config, preset_path


@pytest.mark.parametrize("name,stage,offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_named_preset_is_the_shipped_file_and_sets_its_stage(name, stage, offload):
    cfg = load_config(TrainJobConfig, None, [f"train.deepspeed_preset={name}"])
    assert (cfg.train.zero_stage, cfg.train.offload) == (stage, offload)
    path = preset_path(name)
    assert path.is_file() and path.parent.name == "presets" and path.parent.parent.name == "train"
    ds = deepspeed_config(cfg.train, micro_batch=4, world_size=2)
    shipped = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # the preset's tuning survives, flowrail's keys win
    assert ds["zero_optimization"]["reduce_bucket_size"] == shipped["zero_optimization"]["reduce_bucket_size"]
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8


def test_named_preset_on_the_shipped_train_config_sets_zero3():
    for name in ("train", "run"):
        assert load_config(TrainJobConfig, name, ["train.deepspeed_preset=zero3"]).train.zero_stage == 3
        assert load_config(TrainJobConfig, name, []).train.zero_stage == 2


def test_explicit_stage_is_kept_and_a_disagreeing_preset_refused():
    cfg = load_config(TrainJobConfig, None, ["train.deepspeed_preset=zero3", "train.zero_stage=2"])
    assert cfg.train.zero_stage == 2
    with pytest.raises(FlowrailError, match="ZeRO-3 preset but train.zero_stage=2"):
        deepspeed_config(cfg.train, micro_batch=4, world_size=1)


def test_relative_preset_path_is_made_absolute_at_load(tmp_path, monkeypatch):
    (tmp_path / "mine.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TrainJobConfig, None, ["train.deepspeed_preset=mine.json"])
    assert cfg.train.deepspeed_preset == str(tmp_path / "mine.json")
    monkeypatch.chdir("/")  # a Ray worker runs elsewhere
    assert deepspeed_config(cfg.train, 4, 1)["zero_optimization"]["reduce_bucket_size"] == 123


@pytest.mark.parametrize("override,key", [("train.deepspeed_preset=zero4", "train.deepspeed_preset"),
                                          ("train.ema_device=gpu", "train.ema_device"),
                                          ("train.grad_accum_steps=0", "train.grad_accum_steps")])
def test_bad_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_unknown_ema_device_refused_by_the_ema_itself():
    from pipeline.train.ema import EMA

    with pytest.raises(ConfigError, match="train.ema_device=gpu"):
        EMA(torch.nn.Linear(2, 2), 0.9, device="gpu")


def test_ema_on_the_cpu_device_averages_the_same():
    from pipeline.train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    a, b = EMA(model, 0.5), EMA(model, 0.5, device="cpu")
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update(model)
    b.update(model)
    assert b.offload and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    x = torch.randn(4, 3)
    assert torch.equal(a.model(x), b.model(x))


def test_resume_onto_another_world_size_names_both(tmp_path):
    from pipeline.train import checkpoint as ckpt_io

    (tmp_path / ckpt_io.META).write_text(json.dumps({"step": 10, "epoch": 0, "world_size": 2, "config": {}}))
    with pytest.raises(CheckpointError, match="written by 2 workers but this run has train.num_workers=4"):
        ckpt_io.restore(tmp_path, engine=None, ema=None, rank=0, world=4)  # refused before anything is loaded


def test_global_batch_counts_window_and_workers():
    from pipeline.train.engine import global_batch

    assert global_batch(TrainConfig(grad_accum_steps=4), micro_batch=8, world_size=3) == 96


def test_rerun_under_another_world_size_is_refused_on_the_driver(trained_digits, capsys):
    """A re-run of a finished 2-worker run (same run_dir and run_name: Ray Train would restore its latest registered
    checkpoint) with train.num_workers=1 is refused by the driver, in one line, before Ray or MLflow are touched."""
    from pipeline.config import TrainJobConfig
    from pipeline.train.checkpoint_read import resume_world_size
    from pipeline.train.trainer import fit

    cfg, result = trained_digits
    run_storage = f"{cfg.run_dir}/ray/{cfg.run_name}"
    found = resume_world_size(run_storage)
    assert found is not None and found[1] == 2 and found[0].startswith(run_storage)
    steps = [json.loads(m.read_text())["step"] for m in Path(run_storage).glob("checkpoint_*/flowrail.json")]
    assert json.loads(Path(found[0], "flowrail.json").read_text())["step"] == max(steps)  # the latest (other tests
    # may have continued the shared run)
    assert resume_world_size(f"{cfg.run_dir}/ray/never-ran") is None
    fewer = TrainJobConfig.model_validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), "num_workers": 1}})
    with pytest.raises(CheckpointError, match="written by 2 workers but this run has train.num_workers=1") as err:
        fit(fewer)
    assert "\n" not in str(err.value) and "init_from=" in str(err.value)


def test_one_worker_runs_zero2_as_stage0_unless_told_otherwise():
    """train.stage0_single_worker: ZeRO-1/2 on one worker partitions nothing, so DeepSpeed runs stage 0; two workers,
    ZeRO-3, offload, a preset or the setting off keep the stage given."""
    def stage(world: int = 1, **train: object) -> int:
        return deepspeed_config(TrainConfig(**train), micro_batch=4, world_size=world)["zero_optimization"]["stage"]

    assert stage() == 0 and stage(zero_stage=1) == 0
    assert stage(world=2) == 2 and stage(stage0_single_worker=False) == 2
    assert stage(zero_stage=3) == 3 and stage(zero_stage=2, offload=True) == 2
    assert stage(deepspeed_preset="zero2") == 2


def test_zero3_buckets_follow_the_model_width_unless_a_preset_sets_them():
    """DeepSpeed's default 5e8-element reduce bucket is 1.9 GiB of fp32 gradients per rank whatever the world size:
    without a preset, ZeRO-3 sizes its buckets from the model's width (h², 0.9 h², 10 h)."""
    from pipeline.config import ModelConfig
    from pipeline.flux.model import build_flux_model, tiny_flux_config
    from pipeline.models import build_model
    from pipeline.train.engine import model_width

    sit = build_model(ModelConfig(hidden_size=48, depth=1, num_heads=2, patch_size=2), in_channels=1, input_size=8,
                      num_classes=10)
    assert model_width(sit) == 48
    tiny = tiny_flux_config()
    assert model_width(build_flux_model(None, tiny=True)) == tiny["num_attention_heads"] * tiny["attention_head_dim"]
    zero = deepspeed_config(TrainConfig(zero_stage=3), micro_batch=4, world_size=2, width=48)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (48 * 48, int(0.9 * 48 * 48), 480)
    assert "reduce_bucket_size" not in deepspeed_config(TrainConfig(zero_stage=2), 4, 2, width=48)["zero_optimization"]
    preset = load_config(TrainJobConfig, None, ["train.deepspeed_preset=zero3"]).train
    shipped = json.loads(preset_path("zero3").read_text())["zero_optimization"]["reduce_bucket_size"]
    assert deepspeed_config(preset, 4, 2, width=48)["zero_optimization"]["reduce_bucket_size"] == shipped
