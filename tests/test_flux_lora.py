"""LoRA / full fine-tuning modes and their on-disk formats (diffusers LoRA file, diffusers folder)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import FluxTransformer2DModel  # noqa: E402
from safetensors import safe_open  # noqa: E402

from pipeline.config import FluxConfig  # noqa: E402
from pipeline.flux.lora import LORA_FILE, load_lora, prepare_for_training, save_finetuned  # noqa: E402
from pipeline.flux.model import build_flux_model, tiny_flux_config  # noqa: E402
from pipeline.flux.objective import flux_velocity  # noqa: E402


def _base(tmp_path):
    torch.manual_seed(0)
    base = FluxTransformer2DModel.from_config(tiny_flux_config())
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _probe(model):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    t5, pooled = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 16, generator=gen)
    with torch.no_grad():
        return flux_velocity(model.eval(), x, torch.tensor([0.2, 0.7]), t5, pooled, 1.0)


def _train_a_bit(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        out = _probe_train(model)
        opt.zero_grad()
        out.backward()
        opt.step()


def _probe_train(model):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    t5, pooled = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 16, generator=gen)
    return (flux_velocity(model.train(), x, torch.tensor([0.4, 0.6]), t5, pooled, 1.0) - 1).pow(2).mean()


def test_lora_freezes_base_saves_diffusers_format_and_reloads(tmp_path):
    cfg = FluxConfig(weights=str(_base(tmp_path)), mode="lora", lora_rank=4, lora_alpha=8)
    base_out = _probe(build_flux_model(cfg))
    model = prepare_for_training(build_flux_model(cfg), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("add_q_proj.lora_A" in n for n in trainable) and any("single_transformer_blocks" in n for n in trainable)
    assert model.is_gradient_checkpointing
    torch.testing.assert_close(_probe(model), base_out)  # B = 0 at init: starts at the base model
    _train_a_bit(model)
    tuned_out = _probe(model)
    assert not torch.allclose(tuned_out, base_out)

    save_finetuned(model, cfg, tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / LORA_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)

    fresh = load_lora(build_flux_model(cfg), tmp_path / "lora")
    reloaded = _probe(fresh)
    assert not torch.allclose(reloaded, base_out)
    torch.testing.assert_close(reloaded, tuned_out, atol=1e-5, rtol=1e-5)


def test_full_finetune_saves_a_diffusers_folder(tmp_path):
    cfg = FluxConfig(weights=str(_base(tmp_path)), mode="full", grad_checkpointing=False)
    model = prepare_for_training(build_flux_model(cfg), cfg)
    assert all(p.requires_grad for p in model.parameters())
    _train_a_bit(model, steps=1)
    save_finetuned(model, cfg, tmp_path / "full")
    reloaded = build_flux_model(FluxConfig(weights=str(tmp_path / "full")))
    torch.testing.assert_close(_probe(reloaded), _probe(model))


def test_unknown_lora_target_is_named(tmp_path):
    cfg = FluxConfig(weights=str(_base(tmp_path)), lora_targets=["to_q", "not_a_layer"])
    with pytest.raises(ValueError, match="not_a_layer"):
        prepare_for_training(build_flux_model(cfg), cfg)
