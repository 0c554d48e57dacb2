"""Frozen-base runs save lean checkpoints: a tiny FLUX LoRA through the real path (``build_worker_model`` from a saved
``flux.weights`` folder, DeepSpeed ZeRO-2 on CPU/gloo, world 1): the frozen base is not in the checkpoint, the base
is referenced by its fingerprint, a resume restores every tensor, and a resume on another base is refused."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import TrainJobConfig  # noqa: E402
from pipeline.data.streaming import DataInfo  # noqa: E402
from pipeline.errors import CheckpointError  # noqa: E402
from pipeline.train import checkpoint as ckpt_io  # noqa: E402

INFO = DataInfo(kind="latents", field="latent.npy", channels=16, size=4, num_classes=2, num_samples=4)


def _base(path, seed: int, **changes):
    from diffusers import FluxTransformer2DModel

    from pipeline.flux.model import tiny_flux_config

    torch.manual_seed(seed)
    FluxTransformer2DModel.from_config({**tiny_flux_config(), **changes}).save_pretrained(path)
    return path


def _cfg(weights) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "model": {"name": "flux"}, "flux": {"weights": str(weights), "mode": "lora", "lora_rank": 4,
                                            "grad_checkpointing": False},
        "train": {"zero_stage": 2, "stage0_single_worker": False, "lr": 1e-2, "ema_decay": 0.9}})


def _built(cfg, seed: int):
    from pipeline.train.ema import make_ema
    from pipeline.train.engine import build_engine
    from pipeline.train.worker_setup import build_worker_model

    torch.manual_seed(seed)
    model = build_worker_model(cfg, INFO, micro_batch=2, world=1)
    ema = make_ema(model, cfg.train.ema_decay)
    return build_engine(model, cfg.train, 2, 1), ema


def _step(engine, ema) -> None:
    from pipeline.flux.objective import flux_velocity

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    t5, pooled = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 16, generator=gen)
    loss = (flux_velocity(engine.module.train(), x, torch.tensor([0.4, 0.6]), t5, pooled, 1.0) - 1).pow(2).mean()
    engine.backward(loss)
    engine.step()
    ema.update(engine.module)


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_lora_checkpoint_holds_no_frozen_base_and_resumes_exactly(ds_process_group, tmp_path):
    cfg = _cfg(_base(tmp_path / "base", 0))
    engine, ema = _built(cfg, 0)
    _step(engine, ema)
    ckpt = tmp_path / "ckpt"
    ckpt_io.save(ckpt, engine=engine, ema=ema, state=ckpt_io.TrainState(step=1), cfg=cfg, info=INFO, rank=0)
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
    trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    module = torch.load(ckpt / "deepspeed/state/mp_rank_00_model_states.pt", weights_only=False)
    assert set(module["module"]) == trained and not frozen & set(module["module"])
    assert not module.get("frozen_param_fragments")  # ZeRO-2 kept a second copy of the base here before
    n_trained = sum(engine.module.get_parameter(n).numel() for n in trained)
    n_frozen = sum(engine.module.get_parameter(n).numel() for n in frozen)
    tensor_bytes = sum(p.stat().st_size for p in (ckpt / "deepspeed/state").iterdir())
    assert tensor_bytes < 4 * n_frozen, (tensor_bytes, n_frozen)  # less than one fp32 copy of the base
    assert 16 * n_trained < tensor_bytes  # weights + fp32 master + two AdamW moments are there
    meta = ckpt_io.read_meta(ckpt)
    assert meta["frozen_base"]["flux_weights"] == str(tmp_path / "base") and meta["frozen_base"]["flux_weights_sha256"]

    fresh, fresh_ema = _built(cfg, 1)  # other LoRA values; the base is flux.weights again
    ckpt_io.restore(ckpt, engine=fresh, ema=fresh_ema, rank=0, world=1, cfg=cfg)
    want, got = _params(engine), _params(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)
    _step(engine, ema)  # the AdamW moments came back: one more identical step stays identical
    _step(fresh, fresh_ema)
    want, got = _params(engine), _params(fresh)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_resume_on_another_base_is_refused_in_one_line(ds_process_group, tmp_path):
    cfg = _cfg(_base(tmp_path / "base", 0))
    engine, ema = _built(cfg, 0)
    ckpt = tmp_path / "ckpt"
    ckpt_io.save(ckpt, engine=engine, ema=ema, state=ckpt_io.TrainState(step=1), cfg=cfg, info=INFO, rank=0)
    other = _cfg(_base(tmp_path / "other", 3, guidance_embeds=False))
    fresh, fresh_ema = _built(other, 1)
    with pytest.raises(CheckpointError) as err:
        ckpt_io.restore(ckpt, engine=fresh, ema=fresh_ema, rank=0, world=1, cfg=other)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "other") in message and "another model" in message, message
