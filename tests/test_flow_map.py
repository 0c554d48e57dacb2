"""Flow maps (pipeline/flow_map, decoupled SiT conditioning): the exact-teacher property, the JVP target against
its finite difference, a closed-form Gaussian mixture where a briefly trained flow map beats Euler at one step,
few-step sampling, and the one-line refusals."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, TrainJobConfig, load_config
from pipeline.flow_map.identity import adaptive_loss, meanflow_target, u_and_derivative
from pipeline.flow_map.sampler import sample_flow_map
from pipeline.flow_map.times import sample_pairs, sampling_grid
from pipeline.models.sit import build_sit


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops: one intra-op thread is several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_sit(depth: int = 3, seed: int = 0) -> nn.Module:
    """A SiT whose zero-initialised layers are randomised, so every block and the time embedding matter."""
    torch.manual_seed(seed)
    model = build_sit(None, in_channels=1, input_size=8, num_classes=10, hidden_size=32, depth=depth, num_heads=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------- decoupled conditioning


def test_decoupled_sit_with_target_equal_current_time_is_the_teacher(tmp_path: Path) -> None:
    """init_from an official-format SiT checkpoint; u(x, s, s) equals the teacher's v(x, s) to 1e-6 for every k,
    and differs from it once the target time differs (the last k blocks really see the target time)."""
    from pipeline.train.init_from import initialise_from

    teacher = small_sit().eval()
    path = tmp_path / "sit.pt"
    torch.save({"model": teacher.state_dict(), "ema": teacher.state_dict(), "opt": {}}, path)
    student = build_sit(None, in_channels=1, input_size=8, num_classes=10, hidden_size=32, depth=3, num_heads=4)
    initialise_from(student, str(path))
    student.eval()
    x, s, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.tensor([0, 3, 9, 10, 4])
    v = teacher(x, s, y=y)
    for k in (1, 2, 3):
        assert torch.allclose(student(x, s, y=y, target_time=s, decoupled_blocks=k), v, atol=1e-6, rtol=0)
        moved = student(x, s, y=y, target_time=(s + 0.3).clamp(max=1), decoupled_blocks=k)
        assert (moved - v).abs().max() > 1e-3
    # k blocks see r: changing r leaves the first depth - k blocks' input untouched, so k = depth differs from k = 1
    r = torch.rand(5)
    assert (student(x, s, y=y, target_time=r, decoupled_blocks=1)
            - student(x, s, y=y, target_time=r, decoupled_blocks=3)).abs().max() > 1e-4


def test_decoupled_blocks_outside_the_depth_is_refused() -> None:
    model = small_sit(depth=2)
    x, s = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="decoupled_blocks=3 must be in 1..2"):
        model(x, s, target_time=s, decoupled_blocks=3)


# ---------------------------------------------------------------- the MeanFlow target


def test_jvp_target_equals_finite_difference_target() -> None:
    """torch.func.jvp (math attention kernel) and the central difference give the same u_tgt to 1e-3 (fp32)."""
    model = small_sit().train()
    x, v = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    s = torch.rand(6) * 0.5
    r = s + 0.5 * torch.rand(6)
    y = torch.tensor([1, 2, 3, 10, 5, 6])

    def u_fn(x_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return model(x_, s_, y=y, target_time=r, decoupled_blocks=2, label_dropout=False)

    u_j, d_j = u_and_derivative(u_fn, x, s, v, "func")
    u_f, d_f = u_and_derivative(u_fn, x, s, v, "finite_difference", eps=1e-3)
    assert u_j.requires_grad and not d_j.requires_grad and not d_f.requires_grad
    assert d_j.abs().max() > 0.05  # a derivative that is not trivially zero
    t_j, t_f = meanflow_target(d_j, v, s, r), meanflow_target(d_f, v, s, r)
    assert torch.allclose(u_j, u_f, atol=1e-6)
    assert (t_j - t_f).abs().max() < 1e-3
    # and it is the derivative along (v, 1): a one-sided difference with a large step is visibly worse
    coarse = (u_fn(x + 0.1 * v, s + 0.1) - u_fn(x, s)).detach() / 0.1
    assert (coarse - d_j).abs().max() > 10 * (d_f - d_j).abs().max()


def test_adaptive_weight_power() -> None:
    u, target = torch.zeros(3, 4), torch.tensor([[1.0] * 4, [2.0] * 4, [0.0] * 4])
    assert adaptive_loss(u, target, 0.0, 1e-3).item() == pytest.approx((1 + 4 + 0) / 3)
    assert adaptive_loss(u, target, 1.0, 1e-3).item() == pytest.approx((1 / 1.001 + 4 / 4.001 + 0) / 3, rel=1e-6)


def test_pair_times_follow_the_ratio() -> None:
    cfg = TrainJobConfig().flow_map.model_copy(update={"recipe": "split", "ratio": 0.3})
    torch.manual_seed(0)
    s, r = sample_pairs(cfg, 20000)
    assert bool((s <= r).all()) and float(s.min()) >= 0 and float(r.max()) <= 1
    assert float((s < r).float().mean()) == pytest.approx(0.3, abs=0.02)
    grid = sampling_grid(4, 3.0)
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid.diff() > 0).all()) and grid[1] < 0.25


# ---------------------------------------------------------------- closed-form Gaussian mixture


class MLPFlowMap(nn.Module):
    """u(x, s, r) for 2-D points: an MLP of (x, s, r, r - s)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, s[:, None], r[:, None], (r - s)[:, None]], dim=1))


def exact_endpoint(gmm, path, x0: torch.Tensor, steps: int = 50) -> torch.Tensor:  # noqa: ANN001
    """The true flow map from t = 0 to 1: RK4 on the mixture's exact velocity."""
    x, h = x0.double(), 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * h, dtype=torch.float64)
        k1 = gmm.velocity(path, x, t)
        k2 = gmm.velocity(path, x + h / 2 * k1, t + h / 2)
        k3 = gmm.velocity(path, x + h / 2 * k2, t + h / 2)
        k4 = gmm.velocity(path, x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_flow_map_on_a_gaussian_mixture_beats_euler_at_one_step() -> None:
    """Distilling the exact mixture velocity with the MeanFlow target (torch.func.jvp), a briefly trained MLP's
    one jump x0 + u(x0, 0, 1) lands nearer the true ODE endpoint than one Euler step of the exact velocity."""
    from pipeline.transport.gaussian_mixture import GaussianMixture
    from pipeline.transport.paths import LinearPath

    torch.manual_seed(0)
    gmm, path = GaussianMixture.default_2d(), LinearPath()
    cfg = TrainJobConfig().flow_map.model_copy(update={"recipe": "split", "ratio": 0.75})
    net = MLPFlowMap(64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(250):
        x1 = gmm.sample(128).float()
        x0 = torch.randn_like(x1)
        s, r = sample_pairs(cfg, 128)
        xs = s[:, None] * x1 + (1 - s[:, None]) * x0
        v = gmm.velocity(path, xs, s).float()
        u, du = u_and_derivative(lambda x_, s_: net(x_, s_, r), xs, s, v, "func")
        loss = adaptive_loss(u, meanflow_target(du, v, s, r), 1.0, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    truth = exact_endpoint(gmm, path, x0).float()
    euler = x0 + gmm.velocity(path, x0, torch.zeros(1000)).float()
    one = sample_flow_map(lambda x, s, r, y=None: net(x, s, r), x0, steps=1)
    two = sample_flow_map(lambda x, s, r, y=None: net(x, s, r), x0, steps=2)
    err_euler = (euler - truth).norm(dim=1).mean().item()
    err_one = (one.x - truth).norm(dim=1).mean().item()
    err_two = (two.x - truth).norm(dim=1).mean().item()
    assert one.nfe == 1 and two.nfe == 2
    assert err_one < 0.6 * err_euler, (err_one, err_euler)  # measured: 0.71 vs 1.65
    assert err_two < 0.6 * err_euler, (err_two, err_euler)


# ---------------------------------------------------------------- the objective behind the seam


def flow_map_cfg(*overrides: str) -> TrainJobConfig:
    base = ["model.hidden_size=32", "model.depth=3", "model.num_heads=4", "objective.name=flow_map",
            "sampler.method=flow_map", "sampler.steps=2"]
    return load_config(TrainJobConfig, "run", [*base, *overrides])


def test_objective_loss_trains_and_samples_in_k_calls() -> None:
    from pipeline.flow_map.objective import FlowMapObjective
    from pipeline.objective import build_objective

    obj = build_objective(flow_map_cfg("flow_map.decoupled_blocks=2"), 10)
    assert isinstance(obj, FlowMapObjective)
    model = small_sit()
    calls = []
    model.register_forward_hook(lambda m, args, kw, out: calls.append(kw.get("target_time")), with_kwargs=True)
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.randint(0, 10, (8,))}
    loss = obj.loss(model, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    calls.clear()
    model.eval()
    out = obj.sample(model, {"label": torch.arange(4)}, (4, 1, 8, 8), torch.Generator().manual_seed(0))
    assert out.nfe == 2 and len(calls) == 2 and all(c is not None for c in calls)
    assert out.x.shape == (4, 1, 8, 8) and torch.isfinite(out.x).all()
    # the same flow-map checkpoint sampled as a flow model (ODE on u(x, t, t)) takes the transport samplers
    ode = build_objective(flow_map_cfg("sampler.method=ode", "sampler.steps=3"), 10)
    calls.clear()
    assert ode.sample(model, {"label": torch.arange(2)}, (2, 1, 8, 8)).nfe == 3
    assert calls == [None] * 3


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=family", "sampler.method=flow_map"], "sampler.method=flow_map needs a flow-map model"),
    (["flow_map.decoupled_blocks=4"], "flow_map.decoupled_blocks=4 is outside [1, 3] (the model depth is 3 blocks)"),
    (["flow_map.decoupled_blocks=0"], "flow_map.decoupled_blocks=0 is outside [1, 3]"),
    (["flow_map.jvp=finite_difference", "flow_map.fd_eps=1e-5"],
     "flow_map.fd_eps=1e-05 is below what the fp32 central difference resolves"),
    (["flow_map.fd_eps=1e-2"], "flow_map.fd_eps is set but flow_map.jvp=func"),
    (["flow_map.ratio=0.5"], "flow_map.ratio is a flow_map.recipe=split setting, but flow_map.recipe=dmf"),
    (["flow_map.recipe=split", "flow_map.mf_logit_means=[0, 1]"],
     "flow_map.mf_logit_means is a flow_map.recipe=dmf setting, but flow_map.recipe=split"),
    (["flow_map.guidance=0.6", "guidance.scale=1.5"],
     "guidance.scale=1.5 on a flow map trained with model guidance (flow_map.guidance=0.6)"),
    (["flow_map.guidance=0.6", "model.class_dropout_prob=0"], "flow_map.guidance needs model.class_dropout_prob > 0"),
    (["flow_map.guidance=0.6", "flow_map.guidance_t_min=0.8", "flow_map.guidance_t_max=0.5"],
     "flow_map.guidance_t_min=0.8 is above flow_map.guidance_t_max=0.5"),
    (["flow_map.guidance_t_min=0.5"], "flow_map.guidance_t_min is set but flow_map.guidance=0"),
    (["model.name=dfm"], "objective.name=flow_map needs a SiT model"),
    (["transport.path=gvp"], "needs transport.path=linear"),
    (["train.zero_stage=3"], "flow_map.jvp=func cannot run on ZeRO-3"),
    (["model.grad_checkpointing=true"], "flow_map.jvp=func cannot run through activation checkpointing"),
    (["flow_map.target=teacher"], "flow_map.target=teacher needs a teacher"),
    (["flow_map.jvp=forward"], "flow_map.jvp"),
    (["objective.name=family", "sampler.method=ode", "flow_map.recipe=split"],
     "flow_map.recipe is set but objective.name=family"),
])
def test_bad_flow_map_settings_are_one_line_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        flow_map_cfg(*overrides)
    assert "\n" not in str(info.value)


def test_finite_difference_runs_where_jvp_cannot() -> None:
    """ZeRO-3 and activation checkpointing are accepted with the finite-difference fallback; a model whose
    forward pass has no forward-mode derivative gives one line naming flow_map.jvp."""
    from pipeline.flow_map.identity import JVPUnsupported

    flow_map_cfg("train.zero_stage=3", "flow_map.jvp=finite_difference")
    cfg = flow_map_cfg("model.grad_checkpointing=true", "flow_map.jvp=finite_difference")
    model = build_sit(None, in_channels=1, input_size=8, num_classes=10, hidden_size=32, depth=3, num_heads=4,
                      grad_checkpointing=True).train()
    from pipeline.objective import build_objective

    loss = build_objective(cfg, 10).loss(model, {"image": torch.randn(4, 1, 8, 8), "label": torch.arange(4)})
    loss.backward()

    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return x * 2

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            return g * 2

    with pytest.raises(JVPUnsupported, match="flow_map.jvp=func: this model cannot run forward-mode AD") as info:
        u_and_derivative(lambda x, s: NoForwardAD.apply(x) * s[:, None], torch.randn(3, 2), torch.rand(3),
                         torch.randn(3, 2), "func")
    assert "\n" not in str(info.value)


def test_flow_map_sweep_config_builds_a_flow_map_trial_for_every_grid_point(tmp_path: Path) -> None:
    """jobs/configs/flow_map_sweep.yaml: every (k, power, model guidance) point is a valid DMF-recipe flow-map
    training config that distils the teacher named by init_from (made absolute, as Ray workers read it from another
    directory); no sampling config adds CFG (refused on the guided trials)."""
    import itertools

    from pipeline.sweep.config import base_train_config, load_sweep_config, trial_config

    sweep = load_sweep_config("flow_map_sweep", base=tmp_path)
    base = base_train_config(sweep, tmp_path)
    assert base.init_from == str(tmp_path / "runs" / "ray" / "digits")
    assert sweep.tune.metric == "fd_digits" and base.sampler.method == "flow_map"
    grid = {k: v["grid"] for k, v in sweep.space.items()}
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len(points) == 8
    for point in points:
        cfg = trial_config(base, point)
        assert cfg.objective.name == "flow_map" and cfg.flow_map.target == "teacher"
        assert cfg.flow_map.recipe == "dmf"
        assert cfg.flow_map.decoupled_blocks == point["flow_map.decoupled_blocks"]
    assert [v.sampler["steps"] for v in sweep.sampling.configs] == [1, 2, 4]
    assert all(not getattr(v, "guidance", None) for v in sweep.sampling.configs)
