"""train.grad_accum_steps: K micro-batches of B through a real DeepSpeed engine = one batch of K*B."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig, TrainJobConfig, load_config
from pipeline.models import build_model
from pipeline.train.ema import make_ema
from pipeline.train.engine import build_engine, deepspeed_config

MODEL = TrainJobConfig(model={"hidden_size": 32, "depth": 1, "num_heads": 2, "class_dropout_prob": 0.0}).model


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    """Fixed samples with fixed times and targets: the loss is a deterministic mean over the batch."""
    gen = torch.Generator().manual_seed(11)
    return [{"x": torch.randn(1, 1, 8, 8, generator=gen), "t": torch.rand(1, generator=gen),
             "y": torch.randint(0, 10, (1,), generator=gen), "target": torch.randn(1, 1, 8, 8, generator=gen)}
            for _ in range(n)]


def _train(stage: int, accum: int, micro: int, samples: list[dict[str, torch.Tensor]], stage0: bool = False):
    """The worker loop's step rule: backward every micro-batch, count a step and update the EMA at a boundary."""
    cfg = TrainConfig(zero_stage=stage, lr=1e-2, grad_clip=0.5, warmup_steps=2, grad_accum_steps=accum,
                      stage0_single_worker=stage0)  # stage0=True: one worker's ZeRO-2 runs as stage 0
    torch.manual_seed(0)
    model = build_model(MODEL, in_channels=1, input_size=8, num_classes=10)
    engine = build_engine(model, cfg, micro_batch=micro, world_size=1)
    ema = make_ema(engine.module, 0.7)
    steps = 0
    for i in range(0, len(samples), micro):
        batch = {k: torch.cat([s[k] for s in samples[i:i + micro]]) for k in samples[0]}
        loss = torch.nn.functional.mse_loss(engine(batch["x"], batch["t"], batch["y"]), batch["target"])
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            ema.update(engine.module, ema.decay_at(steps))
            steps += 1
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if stage == 3 else torch.no_grad():
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return steps, weights, ema.state_dict(), engine.global_steps


@pytest.mark.parametrize("stage,stage0", [(2, False), (2, True), (3, False)])
def test_four_micro_batches_of_8_equal_one_batch_of_32(ds_process_group, stage, stage0):
    samples = _data(3 * 32)  # three optimizer steps
    steps_a, weights_a, ema_a, global_a = _train(stage, accum=4, micro=8, samples=samples, stage0=stage0)
    steps_b, weights_b, ema_b, global_b = _train(stage, accum=1, micro=32, samples=samples, stage0=stage0)
    assert steps_a == steps_b == global_a == global_b == 3  # one optimizer step per window
    start = build_model(MODEL, in_channels=1, input_size=8, num_classes=10)
    moved = 0
    for name, w in weights_b.items():
        assert torch.allclose(weights_a[name], w, atol=1e-5, rtol=0), name
        moved += int(not torch.allclose(w, dict(start.named_parameters())[name]))
    assert moved > 0
    assert ema_a.keys() == ema_b.keys()
    for name, e in ema_b.items():
        assert torch.allclose(ema_a[name], e, atol=1e-5, rtol=0), name


def test_deepspeed_config_carries_the_window_and_the_global_batch():
    ds = deepspeed_config(TrainConfig(grad_accum_steps=4), micro_batch=8, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 8


def test_grad_accum_below_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        load_config(TrainJobConfig, None, ["train.grad_accum_steps=0"])


@pytest.mark.slow
def test_accumulation_windows_through_training_and_resume(ray_local, digits_shards, tmp_path):
    """1 worker, data.batch_size=256 (5 batches per digits epoch), train.grad_accum_steps=2: 4 steps take 8
    micro-batches (a window spans the epoch end), the resumed run continues from that exact data position."""
    from mlflow.tracking import MlflowClient

    from conftest import tiny_train_overrides
    from pipeline.train.checkpoint import read_meta
    from pipeline.train.trainer import fit

    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="accum", **{
        "data.batch_size": 256, "train.grad_accum_steps": 2, "train.num_workers": 1, "train.steps": 4,
        "train.log_every": 2, "train.checkpoint_every": 2, "train.cpus_per_worker": 1})
    cfg = load_config(TrainJobConfig, "train", overrides)
    first = fit(cfg, make_grid=False)
    meta = read_meta(first.checkpoint)
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (4, 1, 3)  # 8 micro-batches, 5 per epoch
    longer = cfg.model_copy(deep=True)
    longer.train.steps = 6
    second = fit(longer, make_grid=False)
    meta = read_meta(second.checkpoint)
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (6, 2, 2)  # 12 micro-batches
    client = MlflowClient(second.tracking_uri)
    assert second.run_id == first.run_id
    assert [m.step for m in sorted(client.get_metric_history(second.run_id, "loss"), key=lambda m: m.step)] == [2, 4, 6]
    assert {m.value for m in client.get_metric_history(second.run_id, "global_batch")} == {512.0}
