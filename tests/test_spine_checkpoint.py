"""Checkpoint save/restore through a real DeepSpeed engine (CPU accelerator, gloo, world size 1)."""

import pytest
import torch

from pipeline.config import TrainConfig, TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.models import build_model
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.ema import EMA
from pipeline.train.engine import build_engine


def _engine(cfg: TrainJobConfig, seed: int):
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
    ema = EMA(model, 0.9)
    return build_engine(model, cfg.train, micro_batch=4, world_size=1), ema


@pytest.mark.parametrize("stage,stage0", [(2, False), (2, True), (3, False)])
def test_save_restore_gives_identical_weights(ds_process_group, tmp_path, stage, stage0):
    cfg = TrainJobConfig(train=TrainConfig(zero_stage=stage, lr=1e-2, stage0_single_worker=stage0),
                         model={"hidden_size": 32, "depth": 1, "num_heads": 2})
    engine, ema = _engine(cfg, seed=0)
    assert engine.zero_optimization_stage() == (0 if stage0 and stage < 3 else stage)  # one worker: ZeRO-2 as stage 0
    from pipeline.objective import build_objective

    objective = build_objective(cfg, 10)
    for _ in range(3):
        batch = {"image": torch.randn(4, 1, 8, 8), "label": torch.randint(0, 10, (4,))}
        loss = objective.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=4)
    state = ckpt_io.TrainState(step=3, epoch=1)
    ckpt_io.save(tmp_path, engine=engine, ema=ema, state=state, cfg=cfg, info=info, rank=0)
    expected_rng = torch.get_rng_state()

    fresh, fresh_ema = _engine(cfg, seed=123)  # different initial weights
    torch.manual_seed(999)
    restored = ckpt_io.restore(tmp_path, engine=fresh, ema=fresh_ema, rank=0)
    assert (restored.step, restored.epoch) == (3, 1)
    assert torch.equal(torch.get_rng_state(), expected_rng)

    def full(e):
        import deepspeed

        params = list(e.module.parameters())
        with deepspeed.zero.GatheredParameters(params) if stage == 3 else torch.no_grad():
            return {n: p.detach().clone() for n, p in e.module.named_parameters()}

    a, b = full(engine), full(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (n1, p1), (n2, p2) in zip(ema.model.named_parameters(), fresh_ema.model.named_parameters()):
        assert torch.equal(p1, p2), n1
    # the optimizer moments came back too: one more identical step keeps the weights identical
    batch = {"image": torch.randn(4, 1, 8, 8), "label": torch.randint(0, 10, (4,))}
    for e in (engine, fresh):
        torch.manual_seed(5)
        e.backward(objective.loss(e, batch))
        e.step()
    a, b = full(engine), full(fresh)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_missing_checkpoint_is_named(tmp_path):
    from pipeline.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.find_latest(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no (complete )?flowrail checkpoint"):
        ckpt_io.find_latest(tmp_path)


@pytest.mark.parametrize("stage,stage0", [(2, False), (2, True), (3, False)])
def test_bf16_engine_trains_with_fp32_master_weights(ds_process_group, stage, stage0):
    """train.precision=bf16 is torch autocast over fp32 weights: the SiT forward (fp32 time embedding, bf16
    matmuls) runs inside engine.forward, the weights stay fp32, and the loss falls on a fixed batch."""
    from pipeline.objective import build_objective

    cfg = TrainJobConfig(train=TrainConfig(zero_stage=stage, lr=3e-3, precision="bf16", stage0_single_worker=stage0),
                         model={"hidden_size": 32, "depth": 1, "num_heads": 2})
    engine, _ = _engine(cfg, seed=0)
    objective = build_objective(cfg, 10)
    torch.manual_seed(1)
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.randint(0, 10, (8,))}
    losses = []
    for _ in range(30):
        torch.manual_seed(2)  # same noise and times each step: the loss of one fixed problem
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what the worker wraps around every step
            loss = objective.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


def test_compiled_engine_matches_eager_and_checkpoints_plain_weights(ds_process_group, tmp_path):
    """train.compile=true: the engine's module is torch.compile'd in place (inductor, the real backend), takes the
    same steps as the eager engine from the same weights, and its checkpoint loads into an eager engine."""
    from pipeline.objective import build_objective

    base = {"model": {"hidden_size": 32, "depth": 1, "num_heads": 2}}
    eager_cfg = TrainJobConfig(train=TrainConfig(lr=1e-2), **base)
    compiled_cfg = TrainJobConfig(train=TrainConfig(lr=1e-2, compile=True), **base)
    eager, _ = _engine(eager_cfg, seed=0)
    compiled, ema = _engine(compiled_cfg, seed=0)
    assert compiled.is_compiled and not eager.is_compiled
    objective = build_objective(eager_cfg, 10)
    torch.manual_seed(1)
    batches = [{"image": torch.randn(4, 1, 8, 8), "label": torch.randint(0, 10, (4,))} for _ in range(3)]
    for batch in batches:
        losses = []
        for engine in (eager, compiled):
            torch.manual_seed(7)
            loss = objective.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        ema.update(compiled.module)
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    a = dict(eager.module.named_parameters())
    b = dict(compiled.module.named_parameters())
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    # Adam moves an element by about lr whatever its gradient's size, so rounding can flip the step of a
    # near-zero gradient element: bound the worst element by that and require the rest to agree closely
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() <= 2 * 1e-2 * len(batches) and diff.median() < 1e-4, (diff.max(), diff.median(), diff.mean())

    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=4)
    ckpt_io.save(tmp_path, engine=compiled, ema=ema, state=ckpt_io.TrainState(step=3), cfg=compiled_cfg, info=info,
                 rank=0)
    fresh, fresh_ema = _engine(eager_cfg, seed=123)
    ckpt_io.restore(tmp_path, engine=fresh, ema=fresh_ema, rank=0)
    assert all(torch.equal(b[k], p) for k, p in fresh.module.named_parameters())
