"""FLUX packing, the t <-> sigma boundary, the shifted Euler sampler and the training loss, on a tiny transformer."""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from pipeline.config import TrainJobConfig  # noqa: E402
from pipeline.flux.model import tiny_flux_config  # noqa: E402
from pipeline.flux.objective import FluxObjective, flux_velocity, loss_weight  # noqa: E402
from pipeline.flux.packing import denormalize_latents, image_ids, normalize_latents, pack_latents, unpack_latents  # noqa: E402


def _cfg(**flux) -> TrainJobConfig:
    cfg = TrainJobConfig()
    cfg.model.name = "flux"
    cfg.sampler.steps = 6
    for k, v in flux.items():
        setattr(cfg.flux, k, v)
    return cfg


def _model(guidance_embeds=True, seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel.from_config(tiny_flux_config(guidance_embeds=guidance_embeds))


def _cond(b=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {"t5": torch.randn(b, 5, 32, generator=gen), "clip_pooled": torch.randn(b, 16, generator=gen)}


def test_packing_matches_diffusers_layout_and_round_trips():
    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x)
    # diffusers' unpack takes pixel sizes and the VAE factor (8): 6x8 latents <- 48x64 pixels
    torch.testing.assert_close(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 48, 64, 8))
    torch.testing.assert_close(image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    z = torch.randn(3, 16, 4, 4)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, 0.1159, 0.3611), 0.1159, 0.3611), z)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_schedule_is_diffusers_flux_shifted_sigmas():
    obj = FluxObjective.from_config(_cfg())
    h = w = 32  # 256 tokens
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    n = obj.sample_steps
    sigmas = [1.0 - i / n for i in range(n)]
    sched.set_timesteps(sigmas=sigmas, mu=calculate_shift(16 * 16), device="cpu")
    torch.testing.assert_close(1 - obj.schedule(h, w).float(), sched.sigmas.float(), atol=1e-6, rtol=0)


def test_sampler_matches_diffusers_euler_loop():
    """Our t-convention sampler = the FluxPipeline denoising loop (timestep/1000, guidance, scheduler.step)."""
    model = _model().eval()
    obj = FluxObjective.from_config(_cfg(guidance=3.5))
    cond = _cond()
    shape = (2, 16, 8, 8)
    ours = obj.sample(model, cond, shape, generator=torch.Generator().manual_seed(7))
    assert ours.nfe == obj.sample_steps and ours.x.shape == shape

    latents = pack_latents(torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    n = obj.sample_steps
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0 - i / n for i in range(n)], mu=calculate_shift(latents.shape[1]))
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    with torch.no_grad():
        for t in sched.timesteps:
            pred = model(hidden_states=latents, timestep=t.expand(2) / 1000, guidance=torch.full((2,), 3.5),
                         pooled_projections=cond["clip_pooled"], encoder_hidden_states=cond["t5"],
                         txt_ids=torch.zeros(5, 3), img_ids=img_ids, return_dict=False)[0]
            latents = sched.step(pred, t, latents, return_dict=False)[0]
    torch.testing.assert_close(ours.x, unpack_latents(latents, 8, 8), atol=1e-4, rtol=1e-4)


def test_guidance_value_reaches_a_distilled_model_and_is_ignored_otherwise():
    x, t = torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.6])
    cond = _cond()
    with torch.no_grad():
        dev = _model(True)
        v1 = flux_velocity(dev, x, t, cond["t5"], cond["clip_pooled"], 1.0)
        v2 = flux_velocity(dev, x, t, cond["t5"], cond["clip_pooled"], 3.5)
        assert not torch.allclose(v1, v2)
        schnell = _model(False)
        torch.testing.assert_close(flux_velocity(schnell, x, t, cond["t5"], cond["clip_pooled"], 1.0),
                                   flux_velocity(schnell, x, t, cond["t5"], cond["clip_pooled"], 3.5))


def test_loss_weights():
    s = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(loss_weight(s, "none"), torch.ones(2))
    torch.testing.assert_close(loss_weight(s, "sigma_sqrt"), torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(loss_weight(s, "cosmap"), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    with pytest.raises(ValueError, match="loss_weighting"):
        loss_weight(s, "bogus")


def test_full_finetune_loss_decreases_on_fixed_batch():
    cfg = _cfg(loss_weighting="cosmap")
    cfg.transport.time_sampler = "logit_normal"
    cfg.transport.resolution_shift = True
    obj = FluxObjective.from_config(cfg)
    model = _model().train()
    gen = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(4, 16, 4, 4, generator=gen), **_cond(4)}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def avg_loss(n=8):
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(obj.loss(model, batch).item() for _ in range(n)) / n

    before = avg_loss()
    torch.manual_seed(0)
    for _ in range(25):
        loss = obj.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert avg_loss() < 0.85 * before


def test_missing_batch_key_is_named():
    obj = FluxObjective.from_config(_cfg())
    with pytest.raises(ValueError, match="'t5'"):
        obj.loss(_model(), {"latent": torch.randn(1, 16, 4, 4), "clip_pooled": torch.randn(1, 16)})
