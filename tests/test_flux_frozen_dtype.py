"""A bf16 FLUX LoRA run holds the frozen base in bf16 and trains fp32 LoRA weights (tiny FLUX, real engine)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import TrainJobConfig, load_config
from pipeline.data.streaming import DataInfo
from pipeline.flux.model import build_flux_model

INFO = DataInfo(kind="latents", field="latent.npy", channels=16, size=4, num_classes=0, num_samples=2)


def _cfg(tmp_path, precision: str, mode: str = "lora", stage: int = 2) -> TrainJobConfig:
    if not (tmp_path / "base").exists():
        torch.manual_seed(0)
        build_flux_model(None, tiny=True).save_pretrained(tmp_path / "base")
    return load_config(TrainJobConfig, None, ["model.name=flux", f"flux.mode={mode}", f"train.precision={precision}",
                                              f"flux.weights={tmp_path / 'base'}", "flux.lora_rank=4",
                                              "flux.grad_checkpointing=false", "train.lr=1e-2", f"train.zero_stage={stage}"])


def _dtype(p: torch.nn.Parameter) -> torch.dtype:
    """A parameter's storage dtype (under ZeRO-3 its partition's)."""
    return p.ds_tensor.dtype if hasattr(p, "ds_id") else p.dtype


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_lora_run_keeps_the_frozen_base_in_bf16_and_trains_fp32_lora(ds_process_group, tmp_path, stage):
    from pipeline.flux.objective import FluxObjective
    from pipeline.train.ema import make_ema
    from pipeline.train.engine import build_engine
    from pipeline.train.worker_setup import build_worker_model

    cfg = _cfg(tmp_path, "bf16", stage=stage)
    model = build_worker_model(cfg, INFO, micro_batch=2)  # under ZeRO-3: built partitioned (deepspeed.zero.Init)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {_dtype(p) for p in frozen.values()} == {torch.bfloat16}
    assert {_dtype(p) for p in trained.values()} == {torch.float32}

    if stage == 3:
        engine = build_engine(model, cfg.train, micro_batch=2, world_size=1)
        ema = make_ema(engine.module, 0.5)
    else:
        ema = make_ema(model, 0.5)
        engine = build_engine(model, cfg.train, micro_batch=2, world_size=1)
    objective = FluxObjective.from_config(cfg)
    gen = torch.Generator().manual_seed(1)
    batch = {"latent": torch.randn(2, 16, 4, 4, generator=gen), "t5": torch.randn(2, 5, 32, generator=gen),
             "clip_pooled": torch.randn(2, 16, generator=gen)}
    before = ema.state_dict()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective.loss(engine, batch)
        assert torch.isfinite(loss)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
    live = dict(engine.module.named_parameters())
    assert all(_dtype(live[n]) == torch.bfloat16 for n in frozen)  # the engine did not upcast the base
    assert all(_dtype(live[n]) == torch.float32 for n in trained)
    after = ema.state_dict()
    assert any(not torch.equal(after[n], before[n]) for n in trained)  # the LoRA weights trained
    assert all(v.dtype == torch.float32 for v in after.values())


def test_fp32_and_full_runs_load_the_base_as_stored(tmp_path):
    from pipeline.train.worker_setup import build_worker_model

    for precision, mode in (("fp32", "lora"), ("bf16", "full")):
        model = build_worker_model(_cfg(tmp_path, precision, mode), INFO)
        assert {p.dtype for p in model.parameters()} == {torch.float32}, (precision, mode)
