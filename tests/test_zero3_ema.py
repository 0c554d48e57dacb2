"""Sharded EMA under ZeRO-3: two gloo ranks, a real DeepSpeed engine each, against a ZeRO-2 run on the same batches."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig, TrainJobConfig
from pipeline.data.streaming import DataInfo
from spawn_ranks import run_ranks

CFG = TrainJobConfig(model={"hidden_size": 32, "depth": 1, "num_heads": 2},
                     train=TrainConfig(lr=1e-2, ema_decay=0.8, num_workers=2))
INFO = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=8)
STEPS = 4


def _run(stage: int, rank: int, seed: int = 0):
    """Same start (seeded model) and, per rank, the same batches and noise draws for every stage."""
    from pipeline.models import build_model
    from pipeline.objective import build_objective
    from pipeline.train.ema import make_ema
    from pipeline.train.engine import build_engine

    cfg = CFG.model_copy(update={"train": CFG.train.model_copy(update={"zero_stage": stage})})
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
    engine = build_engine(model, cfg.train, micro_batch=4, world_size=2)
    ema = make_ema(engine.module, cfg.train.ema_decay)
    objective = build_objective(cfg, 10)
    gen = torch.Generator().manual_seed(100 + rank)
    torch.manual_seed(200 + rank)
    for step in range(STEPS):
        batch = {"image": torch.randn(4, 1, 8, 8, generator=gen), "label": torch.randint(0, 10, (4,), generator=gen)}
        engine.backward(objective.loss(engine, batch))
        engine.step()
        ema.update(engine.module, ema.decay_at(step))
    return cfg, engine, ema


def _probe(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    with torch.no_grad():
        return model(x, t, y)


def _rank_main(rank: int, init_file: str, ckpt_dir: str) -> dict:
    import torch.distributed as dist

    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.ema import EMA, ShardedEMA

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _, _, ema2 = _run(2, rank)
        assert type(ema2) is EMA
        cfg, engine3, ema3 = _run(3, rank)
        assert type(ema3) is ShardedEMA
        trained = sum(p.ds_numel for p in engine3.module.parameters() if p.requires_grad)
        sampled = ema3.model  # collective: both ranks build it
        result = {"owned": ema3.owned_numel(), "trained": trained, "zero2": ema2.state_dict(),
                  "zero3": ema3.state_dict(), "probe2": _probe(ema2.model), "probe3": _probe(sampled)}
        ckpt_io.save(Path(ckpt_dir), engine=engine3, ema=ema3,
                     state=ckpt_io.TrainState(step=STEPS), cfg=cfg, info=INFO, rank=rank, world=2)
        dist.barrier()
        _, fresh, fresh_ema = _run(3, rank, seed=1)  # other initial weights, then restored
        ckpt_io.restore(Path(ckpt_dir), engine=fresh, ema=fresh_ema, rank=rank)
        result["restored"] = fresh_ema.state_dict()
        result["restored_shards"] = [s.clone() for s in fresh_ema._shards]
        result["shards"] = [s.clone() for s in ema3._shards]
        return result
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_ema_is_sharded_and_equals_the_zero2_ema(tmp_path):
    from pipeline.train.checkpoint import load_trained

    results = run_ranks(_rank_main, (str(tmp_path / "init"), str(tmp_path / "ckpt")), nprocs=2,
                        out_dir=tmp_path / "out")
    for rank in (0, 1):
        r = results[rank]
        assert r["owned"] <= (0.5 + 0.05) * r["trained"], (rank, r["owned"], r["trained"])
        assert r["zero2"].keys() == r["zero3"].keys()
        for name, ref in r["zero2"].items():
            assert torch.allclose(r["zero3"][name], ref, atol=1e-5, rtol=0), name
        assert torch.allclose(r["probe3"], r["probe2"], atol=1e-5)
        for a, b in zip(r["restored_shards"], r["shards"]):
            assert torch.equal(a, b)
    # the two ranks' partitions are disjoint halves: each holds a different part of the EMA
    assert results[0]["owned"] + results[1]["owned"] >= results[0]["trained"]
    ema = results[0]["zero3"]
    assert not torch.allclose(ema[next(iter(ema))], torch.zeros(()))
    # the checkpoint written from shards is the full EMA: load_trained samples with it on one process
    trained = load_trained(tmp_path / "ckpt")
    assert torch.allclose(_probe(trained.model), results[0]["probe2"], atol=1e-5)
