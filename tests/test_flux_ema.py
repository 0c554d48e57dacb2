"""EMA of a LoRA fine-tune: frozen base weights are shared with the live model, checkpoints hold the adapter only."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import FluxConfig, TrainConfig, TrainJobConfig
from pipeline.flux.lora import prepare_for_training
from pipeline.flux.model import build_flux_model
from pipeline.flux.objective import flux_velocity
from pipeline.train.ema import EMA

LORA = FluxConfig(mode="lora", lora_rank=4, grad_checkpointing=False)


def _lora_flux(seed: int = 0, weights: str | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = build_flux_model(LORA, tiny=True) if weights is None else build_flux_model(LORA.model_copy(
        update={"weights": weights}))
    return prepare_for_training(base, LORA)


def _probe(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x, t5, pooled = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 5, 32, generator=gen), torch.randn(
        2, 16, generator=gen)
    with torch.no_grad():
        return flux_velocity(model, x, torch.tensor([0.2, 0.8]), t5, pooled, 1.0)


def test_lora_ema_shares_frozen_weights_and_copies_only_the_adapter():
    model = _lora_flux()
    ema = EMA(model, 0.5)
    live = dict(model.named_parameters())
    frozen = [n for n, p in live.items() if not p.requires_grad]
    assert frozen and ema.trained and all("lora_" in n for n in ema.trained)
    own = dict(ema.model.named_parameters())
    for name in frozen:  # same storage: no second copy of the base model
        assert own[name].data_ptr() == live[name].data_ptr(), name
    for name in ema.trained:
        assert own[name].data_ptr() != live[name].data_ptr() and own[name].dtype == torch.float32, name
    for (name, b), (_, lb) in zip(ema.model.named_buffers(), model.named_buffers()):
        assert b.data_ptr() == lb.data_ptr(), name
    copied = sum(p.numel() for n, p in own.items() if p.data_ptr() != live[n].data_ptr())
    assert copied == sum(live[n].numel() for n in ema.trained) < sum(p.numel() for p in live.values()) // 10
    assert set(ema.state_dict()) == set(ema.trained)

    # the update moves the adapter only; B starts at zero, so the EMA must now differ from it
    with torch.no_grad():
        for name in ema.trained:
            live[name].add_(1.0)
    before = {n: own[n].clone() for n in frozen[:3]}
    ema.update(model)
    for name in ema.trained:
        assert torch.allclose(own[name], 0.5 * (live[name] - 1.0) + 0.5 * live[name]), name
    assert all(torch.equal(own[n], before[n]) for n in before)

    # a dtype cast / device move of the live model (what a DeepSpeed engine does) is followed, not copied
    model.double()
    moved = dict(ema.model.named_parameters())
    for name in frozen:
        assert moved[name].data_ptr() == live[name].data_ptr() and moved[name].dtype == torch.float64, name
    assert all(moved[n].dtype == torch.float32 for n in ema.trained)


def test_lora_ema_checkpoint_round_trip_is_exact(ds_process_group, tmp_path):
    """Train a LoRA tiny FLUX a few steps under a real DeepSpeed engine, checkpoint, restore into a fresh engine
    and EMA (other adapter init), and load the checkpoint for sampling: same EMA tensors, same output."""
    from safetensors.torch import load_file

    from pipeline.data.streaming import DataInfo
    from pipeline.flux.export import load_finetuned_from_checkpoint
    from pipeline.flux.objective import FluxObjective
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.engine import build_engine

    torch.manual_seed(0)
    build_flux_model(LORA, tiny=True).save_pretrained(tmp_path / "base")
    cfg = TrainJobConfig(model={"name": "flux"}, flux=LORA.model_copy(update={"weights": str(tmp_path / "base")}),
                         train=TrainConfig(zero_stage=2, lr=1e-2, ema_decay=0.5))

    def engine_and_ema(seed: int):
        model = _lora_flux(seed, cfg.flux.weights)
        ema = EMA(model, cfg.train.ema_decay)
        return build_engine(model, cfg.train, micro_batch=2, world_size=1), ema

    engine, ema = engine_and_ema(0)
    objective = FluxObjective.from_config(cfg)
    gen = torch.Generator().manual_seed(1)
    batch = {"latent": torch.randn(2, 16, 4, 4, generator=gen), "t5": torch.randn(2, 5, 32, generator=gen),
             "clip_pooled": torch.randn(2, 16, generator=gen)}
    for _ in range(3):
        engine.backward(objective.loss(engine, batch))
        engine.step()
        ema.update(engine.module)
    info = DataInfo(kind="latents", field="latent.npy", channels=16, size=4, num_classes=0, num_samples=2)
    ckpt_io.save(tmp_path / "ckpt", engine=engine, ema=ema, state=ckpt_io.TrainState(step=3), cfg=cfg, info=info,
                 rank=0)
    saved = load_file(str(tmp_path / "ckpt" / ckpt_io.EMA_FILE))
    assert set(saved) == set(ema.trained) and all("lora_" in k for k in saved)  # no frozen base weights

    fresh, fresh_ema = engine_and_ema(7)
    assert not all(torch.equal(a, b) for a, b in zip(fresh_ema.state_dict().values(), ema.state_dict().values()))
    ckpt_io.restore(tmp_path / "ckpt", engine=fresh, ema=fresh_ema, rank=0)
    restored = fresh_ema.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in ema.state_dict().items())
    expected = _probe(ema.model)
    assert torch.equal(_probe(fresh_ema.model), expected)
    assert not torch.allclose(expected, _probe(engine.module))  # the EMA is not the live weights

    loaded, _ = load_finetuned_from_checkpoint(tmp_path / "ckpt")
    assert torch.allclose(_probe(loaded), expected, atol=1e-6)


def test_ema_state_that_does_not_fit_is_named():
    ema = EMA(_lora_flux(), 0.9)
    state = ema.state_dict()
    name = ema.trained[0]
    with pytest.raises(ValueError, match=f"trained parameter '{name}'"):
        ema.load_state_dict({k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="'nope.weight'"):
        ema.load_state_dict({**state, "nope.weight": torch.zeros(1)})
    frozen = next(n for n, p in ema.model.named_parameters() if n not in state)
    ema.load_state_dict({**state, frozen: torch.zeros(1)})  # an older full-state file: frozen keys are ignored
