"""Family-specific settings that the walk test only sees as "something changed": FLUX's explicit time shift, ODE
solvers and true CFG (tiny FLUX transformer), and token counts from the built model's patch size (SiT)."""
from __future__ import annotations

import math
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import TrainJobConfig, load_config  # noqa: E402
from pipeline.objective import build_objective  # noqa: E402
from pipeline.transport.timesteps import flux_mu, time_grid  # noqa: E402


def _flux(*overrides: str):
    return build_objective(load_config(TrainJobConfig, None, ["model=flux", "sampler.steps=4", *overrides]), 0)


def test_flux_time_shift_is_explicit():
    """auto (the default) = exp(mu(tokens)); a number = that shift; 1 = a uniform grid (schnell's schedule)."""
    h = w = 32  # 16 x 16 packed tokens = 256
    auto = _flux().schedule(h, w)
    torch.testing.assert_close(auto, time_grid(0.0, 1.0, 4, shift=math.exp(flux_mu(256))))
    torch.testing.assert_close(_flux("sampler.time_shift=auto").schedule(h, w), auto)
    torch.testing.assert_close(_flux("sampler.time_shift=1").schedule(h, w), torch.linspace(0, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(_flux("sampler.time_shift=3").schedule(h, w), time_grid(0.0, 1.0, 4, shift=3.0))


def _tiny_flux():
    from pipeline.flux.model import build_flux_model

    torch.manual_seed(0)
    model = build_flux_model(None, tiny=True).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    text = {"t5": torch.randn(2, 5, 32, generator=g), "clip_pooled": torch.randn(2, 16, generator=g)}
    empty = {"t5_uncond": torch.randn(1, 5, 32, generator=g), "clip_pooled_uncond": torch.randn(1, 16, generator=g)}
    return model, text, empty


def test_flux_solvers_and_true_cfg():
    from pipeline.flux.objective import flux_velocity

    model, text, empty = _tiny_flux()
    shape = (2, 16, 4, 4)
    for solver, nfe in (("euler", 4), ("heun", 8), ("midpoint", 8)):
        out = _flux(f"sampler.solver={solver}").sample(model, text, shape, torch.Generator().manual_seed(2))
        assert out.nfe == nfe and torch.isfinite(out.x).all(), solver
    # true CFG: v_u + w (v_c - v_u) against the empty prompt, inside [t_min, t_max] only
    obj = _flux("guidance.scale=4", "guidance.t_min=0.5")
    f = obj._field(model, {**text, **empty}, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        v_c = flux_velocity(model, x, t, text["t5"], text["clip_pooled"], obj.guidance)
        v_u = flux_velocity(model, x, t, empty["t5_uncond"].expand(2, -1, -1), empty["clip_pooled_uncond"].expand(2, -1),
                            obj.guidance)
        got = f(t, x)
    torch.testing.assert_close(got[0], (v_u + 4 * (v_c - v_u))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], v_c[1], atol=1e-5, rtol=1e-5)  # t = 0.2 < t_min: conditional only
    try:
        obj.sample(model, text, shape)
    except ValueError as exc:
        assert "empty prompt" in str(exc)
    else:
        raise AssertionError("CFG without the empty prompt's embeddings must be refused")


def test_resolution_shift_counts_tokens_of_the_built_model():
    """SiT-XL/8 on 32x32 latents has 16 tokens, whatever model.patch_size says."""
    cfg = load_config(TrainJobConfig, None, ["model.name=SiT-XL/8", "transport.resolution_shift=true"])
    transport = build_objective(cfg, 10).transport
    assert transport.patch_size == 8
    assert transport.num_tokens(torch.zeros(1, 4, 32, 32)) == 16
    sit = build_objective(load_config(TrainJobConfig, None, ["model.patch_size=4"]), 10).transport
    assert sit.num_tokens(torch.zeros(1, 4, 32, 32)) == 64
