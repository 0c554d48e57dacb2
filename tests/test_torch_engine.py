"""``train.engine=torch``: the single-rank PyTorch engine trains exactly as DeepSpeed's stage 0 does (accumulation,
clipping, warm-up), checkpoints and resumes, refuses what it cannot do in one line, and runs the real worker loop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig, TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.models import build_model
from pipeline.objective import build_objective
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.ema import EMA
from pipeline.train.engine import build_engine
from pipeline.train.torch_engine import TorchEngine, check_torch_engine

MODEL = {"hidden_size": 32, "depth": 1, "num_heads": 2}
INFO = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=4)


def _cfg(engine: str, **train) -> TrainJobConfig:
    return TrainJobConfig(train=TrainConfig(engine=engine, lr=1e-2, **train), model=MODEL)


def _built(cfg: TrainJobConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
    return build_engine(model, cfg.train, micro_batch=4, world_size=1), EMA(model, 0.9)


def _train(engine, cfg: TrainJobConfig, batches: list[dict], seed: int) -> list[float]:
    """The worker loop's engine calls: backward, boundary, step; the loss noise drawn from ``seed``."""
    objective = build_objective(cfg, 10)
    torch.manual_seed(seed)
    lrs = []
    for batch in batches:
        loss = objective.loss(engine, batch)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            lrs.append(engine.get_lr()[0])
    return lrs


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [{"image": torch.randn(4, 1, 8, 8, generator=g), "label": torch.randint(0, 10, (4,), generator=g)}
            for _ in range(n)]


def test_torch_engine_matches_deepspeed_stage0_with_accumulation_clipping_and_warmup(ds_process_group):
    train = {"grad_accum_steps": 2, "grad_clip": 0.05, "warmup_steps": 3, "weight_decay": 0.01}
    torch_cfg, ds_cfg = _cfg("torch", **train), _cfg("deepspeed", **train)
    plain, _ = _built(torch_cfg)
    deep, _ = _built(ds_cfg)
    assert isinstance(plain, TorchEngine) and deep.zero_optimization_stage() == 0
    batches = _batches(12)
    lrs_plain = _train(plain, torch_cfg, batches, seed=3)
    lrs_deep = _train(deep, ds_cfg, batches, seed=3)
    assert lrs_plain == lrs_deep == pytest.approx([1e-2 * min(1.0, (k + 1) / 3) for k in range(1, 7)])
    start = dict(_built(torch_cfg)[0].module.named_parameters())
    for (name, a), (_, b) in zip(plain.module.named_parameters(), deep.module.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert any(not torch.equal(p, start[n]) for n, p in plain.module.named_parameters())  # it did train


def test_torch_engine_checkpoint_restores_weights_moments_and_counters(tmp_path: Path):
    cfg = _cfg("torch", grad_accum_steps=2)
    engine, ema = _built(cfg)
    _train(engine, cfg, _batches(6), seed=1)
    ema.update(engine.module)
    ckpt_io.save(tmp_path, engine=engine, ema=ema, state=ckpt_io.TrainState(step=3, epoch=0), cfg=cfg, info=INFO,
                 rank=0)
    assert (tmp_path / "torch_engine" / "state" / "engine.pt").is_file() and not (tmp_path / "deepspeed").exists()

    fresh, fresh_ema = _built(cfg, seed=5)
    assert ckpt_io.restore(tmp_path, engine=fresh, ema=fresh_ema, rank=0).step == 3
    assert (fresh.micro_steps, fresh.global_steps) == (6, 3)
    more = _batches(4)
    _train(engine, cfg, more, seed=2)
    _train(fresh, cfg, more, seed=2)  # identical moments and schedule: identical weights after two more steps
    for (name, a), (_, b) in zip(engine.module.named_parameters(), fresh.module.named_parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(ds_process_group, tmp_path: Path):
    deep_cfg = _cfg("deepspeed")
    engine, ema = _built(deep_cfg)
    ckpt_io.save(tmp_path, engine=engine, ema=ema, state=ckpt_io.TrainState(step=1), cfg=deep_cfg, info=INFO, rank=0)
    plain, plain_ema = _built(_cfg("torch"))
    with pytest.raises(ckpt_io.CheckpointError, match="written with train.engine=deepspeed and this run has "
                                                     "train.engine=torch: resume with train.engine=deepspeed"):
        ckpt_io.restore(tmp_path, engine=plain, ema=plain_ema, rank=0)


@pytest.mark.parametrize("train,world,named", [
    ({}, 2, "train.num_workers=2"),
    ({"zero_stage": 3}, 1, "train.zero_stage=3"),
    ({"zero_stage": 3, "offload": True}, 1, "train.zero_stage=3"),
    ({"deepspeed_preset": "zero2"}, 1, "train.deepspeed_preset=zero2"),
])
def test_what_the_torch_engine_cannot_do_is_refused_in_one_line(train, world, named):
    with pytest.raises(ConfigError) as info:
        check_torch_engine(TrainConfig(engine="torch", **train), world)
    assert named in str(info.value) and "train.engine=torch" in str(info.value) and "\n" not in str(info.value)


def test_flowrail_train_refuses_torch_engine_on_two_workers_before_anything_starts(capsys, tmp_path):
    from jobs.cli import main

    assert main(["train", "train.engine=torch", "train.num_workers=2", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.engine=torch" in err and "train.num_workers=2" in err, err
    assert not any(tmp_path.iterdir())


def test_one_worker_trains_and_resumes_with_the_torch_engine(ray_local, digits_shards, tmp_path):
    """The real worker loop (Ray Train, Ray Data, EMA, NaN guard, logging) on the torch engine; a re-run resumes."""
    from pipeline.config import load_config
    from pipeline.train.checkpoint import load_trained, read_meta
    from pipeline.train.trainer import fit
    from conftest import tiny_train_overrides

    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="plain", **{
        "train.engine": "torch", "train.num_workers": 1, "train.steps": 10, "train.checkpoint_every": 10})
    first = fit(load_config(TrainJobConfig, "train", overrides), make_grid=False)
    assert (Path(first.checkpoint) / "torch_engine" / "state" / "engine.pt").is_file()
    second = fit(load_config(TrainJobConfig, "train", [*overrides, "train.steps=15"]), make_grid=False)
    assert second.run_id == first.run_id and read_meta(second.checkpoint)["step"] == 15
    assert load_trained(second.checkpoint).step == 15
