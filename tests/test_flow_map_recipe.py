"""Flow maps at the authors' recipe: derivatives correct under bf16 autocast, the Decoupled MeanFlow training mix
(both losses on every batch, own logit-normal times, ||delta||^2 with the adaptive weight), the decoupled depth
scaled with the model, model guidance in training, and the one-line refusals (exit 2 at the CLI)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.config import TrainJobConfig, load_config
from pipeline.flow_map.identity import adaptive_loss, meanflow_target, u_and_derivative
from pipeline.models.sit import build_sit
from test_flow_map import _one_thread  # noqa: F401  (autouse: one intra-op thread for many tiny ops)


def sit(hidden: int = 64, depth: int = 3, seed: int = 0) -> nn.Module:
    """SiT hidden 64 depth 3 (the digits model) with its zero-initialised layers randomised."""
    torch.manual_seed(seed)
    model = build_sit(None, in_channels=1, input_size=8, num_classes=10, hidden_size=hidden, depth=depth, num_heads=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def fm_cfg(*overrides: str) -> TrainJobConfig:
    base = ["model.hidden_size=64", "model.depth=3", "model.num_heads=4", "objective.name=flow_map",
            "sampler.method=flow_map", "sampler.steps=1"]
    return load_config(TrainJobConfig, "run", [*base, *overrides])


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


class AutocastEngine(nn.Module):
    """Stands for a DeepSpeed engine with torch_autocast: its forward re-enters bf16 autocast whatever the caller's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(*args, **kwargs)


# ---------------------------------------------------------------- bf16


def test_both_derivative_modes_under_bf16_autocast_match_an_fp32_jvp() -> None:
    """Under CPU bf16 autocast: torch.func.jvp and the finite difference (eps 1e-3, run in fp32 with autocast off)
    are within 5e-2 of an fp32 JVP; the same difference taken in bf16 is noise (relative error > 0.5). Through the
    objective with an engine that re-enters autocast, the MeanFlow target still matches."""
    from pipeline.flow_map.identity import fp32_difference

    model = sit().train()
    x, v = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    s = torch.rand(16) * 0.5
    r = s + 0.4
    y = torch.randint(0, 10, (16,))

    def u_fn(x_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return model(x_, s_, y=y, target_time=r, decoupled_blocks=1, label_dropout=False)

    _, ref = u_and_derivative(u_fn, x, s, v, "func")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u_j, d_j = u_and_derivative(u_fn, x, s, v, "func")
        u_f, d_f = u_and_derivative(u_fn, x, s, v, "finite_difference", eps=1e-3)
        with torch.no_grad():  # the landed difference: in the autocast dtype
            d_bf16 = (u_fn(x + 1e-3 * v, s + 1e-3) - u_fn(x - 1e-3 * v, s - 1e-3)) / 2e-3
    assert u_j.dtype == torch.bfloat16 and d_f.dtype == torch.float32
    assert rel(d_j, ref) <= 5e-2, rel(d_j, ref)  # measured 9e-3
    assert rel(d_f, ref) <= 5e-2, rel(d_f, ref)  # measured 8e-4
    assert rel(d_bf16, ref) > 0.5, rel(d_bf16, ref)  # measured 7.6
    assert torch.equal(fp32_difference(u_fn, x, s, v, 1e-3), d_f)

    # the objective differences the bare module: an engine's own autocast does not reach the difference
    from pipeline.flow_map.objective import FlowMapObjective

    obj = FlowMapObjective(fm_cfg("flow_map.jvp=finite_difference", "model.class_dropout_prob=0"), 10)
    engine = AutocastEngine(model)
    x1 = torch.randn(16, 1, 8, 8)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, target = obj._meanflow(engine, x1, y, s, r)
    torch.manual_seed(5)
    obj.fm = obj.fm.model_copy(update={"jvp": "func"})
    _, exact = obj._meanflow(model, x1, y, s, r)
    assert rel(target, exact) <= 5e-2, rel(target, exact)


def test_fd_eps_the_dtype_cannot_resolve_exits_2_in_one_line(capsys) -> None:  # noqa: ANN001
    from jobs.cli import main

    assert main(["train", "--config", "flow_map", "flow_map.jvp=finite_difference", "flow_map.fd_eps=1e-6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "flow_map.fd_eps=1e-06 is below what the fp32 central difference resolves" in err and "\n" not in err


# ---------------------------------------------------------------- the DMF training mix


def test_dmf_times_have_their_own_laws() -> None:
    """t_fm ~ sigmoid(N(fm_logit_mean, std)); the MeanFlow pair is (min, max) of draws with means mf_logit_means, so
    the mean of logit(s) + logit(r) is m_1 + m_2."""
    from pipeline.flow_map.times import dmf_times

    fm = fm_cfg().flow_map
    assert fm.recipe == "dmf" and fm.mf_logit_means == (-0.4, 1.2) and fm.fm_logit_mean == 0.0
    torch.manual_seed(0)
    t, s, r = dmf_times(fm, 40000)
    logit = torch.logit
    assert bool((s <= r).all()) and bool((s < r).float().mean() > 0.99)
    assert float(logit(t).mean()) == pytest.approx(0.0, abs=0.03)
    assert float(logit(s).mean() + logit(r).mean()) == pytest.approx(0.8, abs=0.04)
    assert float(logit(r).mean()) > 1.2 > float(logit(s).mean())  # max and min of the two draws
    moved = fm.model_copy(update={"fm_logit_mean": 1.0, "mf_logit_means": (0.0, 0.0)})
    t2, s2, r2 = dmf_times(moved, 40000)
    assert float(logit(t2).mean()) == pytest.approx(1.0, abs=0.03)
    assert float(logit(s2).mean() + logit(r2).mean()) == pytest.approx(0.0, abs=0.04)


def test_squared_norm_error_and_the_adaptive_weight() -> None:
    """error=sum is ||delta||^2 per sample; with p = 1 and ||delta||^2 >> c each sample contributes ~1 (MeanFlow's
    1/l regime), where the mean over D dimensions (the split recipe) is D x smaller and c matters D x more."""
    u, target = torch.zeros(2, 64), torch.cat([torch.full((1, 64), 0.1), torch.zeros(1, 64)])
    assert adaptive_loss(u, target, 0.0, 1e-3, error="sum").item() == pytest.approx(0.64 / 2)
    assert adaptive_loss(u, target, 0.0, 1e-3, error="mean").item() == pytest.approx(0.01 / 2)
    assert adaptive_loss(u, target, 1.0, 1e-3, error="sum").item() == pytest.approx(0.64 / 0.641 / 2, rel=1e-6)
    assert adaptive_loss(u, target, 1.0, 1e-3, error="mean").item() == pytest.approx(0.01 / 0.011 / 2, rel=1e-6)


def test_dmf_loss_is_half_flow_matching_plus_half_meanflow_on_every_sample() -> None:
    """The recipe's loss equals 0.5 (L_fm + L_mf) recomputed by hand from the same random draws: L_fm on u(x_t, t, t)
    against v at its own time, L_mf on u(x_s, s, r) against the MeanFlow target, each on ||delta||^2 with w."""
    from pipeline.flow_map.objective import FlowMapObjective
    from pipeline.flow_map.times import dmf_times

    cfg = fm_cfg("model.class_dropout_prob=0")
    obj = FlowMapObjective(cfg, 10)
    assert obj.k == 1
    model = sit()
    calls: list = []
    model.register_forward_hook(lambda m, args, kw, out: calls.append(kw.get("target_time")), with_kwargs=True)
    x1, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.manual_seed(3)
    loss = obj.loss(model, {"image": x1, "label": y})
    assert len(calls) == 2 and calls[0] is None and calls[1] is not None  # one flow-matching pass, one JVP pass

    torch.manual_seed(3)
    fm = cfg.flow_map
    t, s, r = dmf_times(fm, 8)
    b = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    x0 = torch.randn_like(x1)
    xt = b(t) * x1 + (1 - b(t)) * x0
    l_fm = adaptive_loss(model(xt, t, y=y, label_dropout=False), x1 - x0, 1.0, 1e-3, error="sum")
    x0 = torch.randn_like(x1)
    xs = b(s) * x1 + (1 - b(s)) * x0
    u, du = u_and_derivative(lambda x_, s_: model(x_, s_, y=y, target_time=r, decoupled_blocks=1,
                                                  label_dropout=False), xs, s, x1 - x0, "func")
    l_mf = adaptive_loss(u, meanflow_target(du, x1 - x0, s, r), 1.0, 1e-3, error="sum")
    assert loss.item() == pytest.approx(0.5 * (l_fm + l_mf).item(), rel=1e-5)
    # the split recipe is one loss on one set of pairs, error = mean over dimensions
    split = FlowMapObjective(fm_cfg("model.class_dropout_prob=0", "flow_map.recipe=split"), 10)
    calls.clear()
    split.loss(model, {"image": x1, "label": y})
    assert len(calls) == 1


def test_decoupled_depth_scales_with_the_model() -> None:
    """k = round(depth * 8 / 28), at least 1: 1 of 3 (digits), 3 of 12 (S, B), 7 of 24 (L), 8 of 28 (XL)."""
    from pipeline.flow_map.objective import FlowMapObjective
    from pipeline.flow_map.settings import decoupled_blocks, default_decoupled_blocks, model_depth

    assert [default_decoupled_blocks(d) for d in (1, 2, 3, 12, 24, 28)] == [1, 1, 1, 3, 7, 8]
    for name, k in (("SiT-S/2", 3), ("SiT-L/2", 7), ("SiT-XL/2", 8)):
        cfg = fm_cfg(f"model.name={name}")
        assert model_depth(cfg) == {"SiT-S/2": 12, "SiT-L/2": 24, "SiT-XL/2": 28}[name]
        assert decoupled_blocks(cfg.flow_map, model_depth(cfg)) == k
    assert FlowMapObjective(fm_cfg("model.depth=12"), 10).k == 3
    assert FlowMapObjective(fm_cfg("flow_map.decoupled_blocks=2"), 10).k == 2


def test_model_guidance_in_training() -> None:
    """v <- v + omega sg(u(x,t,t|y) - u(x,t,t|null)) only for kept labels with t in [t_min, t_max]."""
    from pipeline.flow_map.objective import FlowMapObjective

    obj = FlowMapObjective(fm_cfg("flow_map.guidance=0.6", "flow_map.guidance_t_min=0.3"), 10)
    model = sit().eval()
    xt, v = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.5, 0.9, 0.1, 0.6])
    y = torch.tensor([1, 2, 3, 10])  # the last label was dropped
    out = obj.model_guidance(model, v, xt, t, y)
    with torch.no_grad():
        diff = model(xt, t, y=y) - model(xt, t, y=torch.full_like(y, 10))
    assert torch.allclose(out[:2], v[:2] + 0.6 * diff[:2], atol=1e-6)
    assert torch.equal(out[2:], v[2:])  # t outside [0.3, 1]; a dropped label
    assert diff[:2].abs().max() > 1e-3
    # and it reaches the loss: the same draws give a different loss with omega = 0 (p = 0: with p = 1 and
    # ||delta||^2 >> c every sample's weighted loss is ~1 whatever the target)
    obj.fm = obj.fm.model_copy(update={"weight_power": 0.0})
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.randint(0, 10, (8,))}
    torch.manual_seed(1)
    guided = obj.loss(model, batch)
    torch.manual_seed(1)
    plain = FlowMapObjective(fm_cfg("flow_map.weight_power=0"), 10).loss(model, batch)
    assert abs(guided.item() - plain.item()) > 1e-4


def test_sampling_cfg_on_a_guided_map_exits_2_in_one_line(tmp_path, capsys) -> None:  # noqa: ANN001
    """`flowrail evaluate` with guidance.scale != 1 on a checkpoint trained with model guidance: one line, exit 2;
    on an unguided flow-map checkpoint CFG is accepted (the refusal is about the guided map only)."""
    from jobs.cli import main
    from test_flow_map_registry import make_flow_map_checkpoint

    ckpt = make_flow_map_checkpoint(tmp_path)
    meta = json.loads((ckpt / "flowrail.json").read_text())
    meta["config"]["flow_map"]["guidance"] = 0.6
    (ckpt / "flowrail.json").write_text(json.dumps(meta))
    assert main(["evaluate", str(ckpt), "guidance.scale=1.5", "eval.num_samples=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "guidance.scale=1.5 on a flow map trained with model guidance (flow_map.guidance=0.6)" in err
    assert "\n" not in err


def test_a_landed_flow_map_config_loads_as_the_split_recipe() -> None:
    """A checkpoint's config from before recipes (every landed field, no recipe) keeps its recipe: split."""
    landed = {"decoupled_blocks": 1, "jvp": "func", "fd_eps": 1e-3, "target": "teacher", "teacher": None,
              "teacher_guidance": 1.0, "ratio": 0.9, "time_sampler": "uniform", "logit_mean": -0.4, "logit_std": 1.0,
              "weight_power": 1.0, "weight_eps": 1e-3}
    dump = fm_cfg().model_dump(mode="json")
    dump["flow_map"] = landed
    dump["init_from"] = "/some/teacher"
    cfg = TrainJobConfig.model_validate(dump)
    assert cfg.flow_map.recipe == "split" and cfg.flow_map.ratio == 0.9


def test_the_unweighted_errors_are_window_metrics() -> None:
    """The adaptive weight makes each sample's weighted loss ~1 whatever its error, so the objective also keeps the
    window's unweighted ||delta||^2 / D of each loss: equal to the same draws recomputed by hand, averaged over the
    window's micro-batches, reset at each window."""
    from pipeline.flow_map.objective import FlowMapObjective
    from pipeline.flow_map.times import dmf_times

    cfg = fm_cfg("model.class_dropout_prob=0")
    obj = FlowMapObjective(cfg, 10)
    model = sit()
    x1, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    expected = {"flow_matching": [], "meanflow": []}
    b = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    for seed in (3, 4):
        torch.manual_seed(seed)
        loss = obj.loss(model, {"image": x1, "label": y})
        assert loss.item() == pytest.approx(1.0, abs=0.05)  # the weighted loss hides the error's size
        torch.manual_seed(seed)
        t, s, r = dmf_times(cfg.flow_map, 8)
        x0 = torch.randn_like(x1)
        xt = b(t) * x1 + (1 - b(t)) * x0
        u_fm = model(xt, t, y=y, label_dropout=False)
        expected["flow_matching"].append(float((u_fm.detach() - (x1 - x0)).pow(2).mean()))
        x0 = torch.randn_like(x1)
        xs = b(s) * x1 + (1 - b(s)) * x0
        u, du = u_and_derivative(lambda x_, s_: model(x_, s_, y=y, target_time=r, decoupled_blocks=1,
                                                      label_dropout=False), xs, s, x1 - x0, "func")
        expected["meanflow"].append(float((u - meanflow_target(du, x1 - x0, s, r)).pow(2).mean()))
    metrics = obj.window_metrics(obj.window_values())
    for name, values in expected.items():
        assert metrics[f"flow_map/{name}_sq_error"] == pytest.approx(sum(values) / 2, rel=1e-4), name
    assert max(expected["meanflow"]) > 2  # far from the ~1 of the weighted loss
    assert obj.window_values() == {"error_batches": 0.0}  # reset after each window
