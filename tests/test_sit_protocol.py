"""The SiT paper's protocol: the ``sit-xl2-imagenet256`` training preset and the ``sit_sde`` / ``sit_ode`` sampler
presets, checked against formulas written from the paper's description (REFERENCE.md sections 3 and 5):
- SDE: Euler-Maruyama on ``linspace(0, 1 - 0.04, N)`` (N - 1 steps), then the mean last step of size 0.04
  ``x + (v + D s) * 0.04``; N = 250 NFE; D = sigma(t) (the "sigma" form, norm 1).
- ODE: dopri5, atol 1e-6, rtol 1e-3, on [0, 1].
- CFG: ``v_u + w (v_c - v_u)`` on the first 3 latent channels; the 4th keeps the conditional prediction."""
from __future__ import annotations

import torch

from pipeline.config import TrainJobConfig, load_config
from pipeline.objective import build_objective
from pipeline.train.engine import deepspeed_config


def test_training_preset_holds_the_papers_settings():
    cfg = load_config(TrainJobConfig, "sit-xl2-imagenet256")
    t = cfg.train
    assert cfg.model.name == "SiT-XL/2" and cfg.model.learn_sigma and cfg.model.class_dropout_prob == 0.1
    assert (t.lr, t.weight_decay, t.ema_decay) == (1e-4, 0.0, 0.9999)
    assert t.num_workers * cfg.data.batch_size == 256
    assert deepspeed_config(t, cfg.data.batch_size, t.num_workers)["train_batch_size"] == 256
    assert (cfg.transport.path, cfg.transport.prediction) == ("linear", "velocity")


def _counting_model(calls: list):
    """A class-conditional 'model' on 4 channels: out = x * (1 + y) + t, so cond/uncond differ."""

    def fn(x, t, y):
        calls.append(t.detach().clone())
        return x * (1 + y.to(x.dtype)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)

    return fn


def test_sit_sde_preset_grid_last_step_and_nfe():
    cfg = load_config(TrainJobConfig, None, ["model.name=SiT-S/2", "sampler.preset=sit_sde"])
    s = cfg.sampler
    assert (s.method, s.solver, s.steps, s.diffusion, s.last_step, s.last_step_size) == \
        ("sde", "euler", 249, "sigma", "mean", 0.04)
    objective = build_objective(cfg, num_classes=10)
    sampler = objective.sampler
    assert sampler.interval() == (0.0, 0.96)  # SiT's check_interval: velocity + Linear + non-SBDM starts at 0
    calls: list[torch.Tensor] = []
    model = _counting_model(calls)
    x0 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(model, x0, generator=torch.Generator().manual_seed(1), y=torch.tensor([1, 2]))
    assert out.nfe == 250 and len(calls) == 250
    expected_grid = torch.linspace(0.0, 0.96, 250, dtype=torch.float64)  # SiT: th.linspace(t0, t1, num_steps)
    seen = torch.stack([c[0].double() for c in calls])
    torch.testing.assert_close(seen[:249], expected_grid[:249], atol=1e-6, rtol=0)
    assert abs(float(seen[249]) - 0.96) < 1e-6  # the last step is evaluated at t1 = 1 - 0.04

    # the mean last step by formula, from the state before it
    tr = objective.transport
    states = sampler.trajectory(model, x0, generator=torch.Generator().manual_seed(1), y=torch.tensor([1, 2]))
    x, t = states[-2], torch.tensor(0.96, dtype=x0.dtype)
    v, score = tr.velocity_and_score(model, x, t, y=torch.tensor([1, 2]))
    d = 1.0 * (1 - 0.96)  # sigma form: D = sigma(t) = 1 - t on the Linear path
    torch.testing.assert_close(states[-1], x + (v + d * score) * 0.04)


def test_sit_ode_preset():
    cfg = load_config(TrainJobConfig, None, ["model.name=SiT-S/2", "sampler.preset=sit_ode", "sampler.steps=250"])
    sampler = build_objective(cfg, 10).sampler
    assert (sampler.solver, sampler.atol, sampler.rtol) == ("dopri5", 1e-6, 1e-3)
    assert sampler.transport.sample_interval() == (0.0, 1.0)


def test_explicit_settings_win_over_the_preset():
    cfg = load_config(TrainJobConfig, None, ["sampler.preset=sit_sde", "sampler.steps=99", "guidance.channels=4"])
    assert cfg.sampler.steps == 99 and cfg.guidance.channels == 4 and cfg.sampler.method == "sde"


def test_sit_preset_guides_the_first_three_channels():
    cfg = load_config(TrainJobConfig, None, ["model.name=SiT-S/2", "sampler.preset=sit_ode", "guidance.scale=1.5"])
    objective = build_objective(cfg, num_classes=10)
    assert objective.guided_channels == 3
    from pipeline.transport.guidance import guided

    calls: list = []
    model = _counting_model(calls)
    fn = guided(model, null_label=10, scale=1.5, channels=objective.guided_channels)
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    t, y = torch.full((2,), 0.3), torch.tensor([1, 2])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    out = fn(x, t, y=y)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])
    everything = guided(model, null_label=10, scale=1.5)(x, t, y=y)  # flowrail's default: all channels
    torch.testing.assert_close(everything, uncond + 1.5 * (cond - uncond))
