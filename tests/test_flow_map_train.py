"""Flow maps through the real pipeline (slow tier): distillation of a trained SiT under Ray Train with 2 workers
(ZeRO-2, torch.func.jvp, the DMF recipe) with checkpoints, resume and MLflow; ZeRO-3 with the finite-difference
fallback, end to end and, on two gloo ranks with bf16 autocast, its MeanFlow target against an fp32 JVP;
`flowrail evaluate` on flow-map checkpoints, and its one-line refusal on a checkpoint that is not a flow map."""
from __future__ import annotations

import math
import re

import pytest

from conftest import tiny_train_overrides
from spawn_ranks import run_ranks

pytestmark = pytest.mark.slow


def _flow_map_overrides(shards, run_dir, **extra):  # noqa: ANN001, ANN003, ANN202
    base = {"objective.name": "flow_map", "sampler.method": "flow_map", "sampler.steps": 1,
            "train.log_every": 3, "train.checkpoint_every": 3, "samples.per_class": 1}
    return tiny_train_overrides(shards, run_dir, **{**base, **extra})


@pytest.mark.timeout(2400)
def test_flow_map_distils_a_trained_sit_under_ray_train_and_resumes(trained_digits, digits_shards, tmp_path,
                                                                   capsys):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main
    from pipeline.config import TrainJobConfig, load_config, tracking_uri
    from pipeline.train.checkpoint import load_trained, read_meta
    from pipeline.train.trainer import fit

    _, teacher = trained_digits
    over = _flow_map_overrides(digits_shards, tmp_path, run_name="fm", init_from=str(teacher.checkpoint),
                               **{"flow_map.target": "teacher", "train.steps": 6})
    first = fit(load_config(TrainJobConfig, "train", over))
    assert read_meta(first.checkpoint)["step"] == 6 and math.isfinite(first.metrics["loss"])
    # re-running the same run name with more steps resumes from step 6 (model, optimizer, EMA, data position)
    cfg = load_config(TrainJobConfig, "train", [*over, "train.steps=9"])
    second = fit(cfg)
    assert second.run_id == first.run_id and read_meta(second.checkpoint)["step"] == 9
    client = MlflowClient(tracking_uri(cfg))
    assert [m.value for m in client.get_metric_history(first.run_id, "resumed_from_step")] == [6]
    assert len(client.get_metric_history(first.run_id, "loss")) >= 3
    for name in ("flow_map/flow_matching_sq_error", "flow_map/meanflow_sq_error"):  # the unweighted errors
        history = client.get_metric_history(first.run_id, name)
        assert len(history) >= 3 and all(math.isfinite(m.value) and m.value > 0 for m in history), name
    trained = load_trained(second.checkpoint)
    assert trained.config.objective.name == "flow_map" and trained.objective.__class__.__name__ == "FlowMapObjective"

    # `flowrail evaluate` takes the flow-map checkpoint at any step count, and as a flow model (ODE on u(x, t, t))
    for extra, nfe in ((["sampler.steps=2"], 2.0), (["sampler.method=ode", "sampler.steps=4"], 4.0)):
        rc = main(["evaluate", str(second.checkpoint), "eval.num_samples=20", "eval.metrics=[fd_digits]",
                   f"eval.cache_dir={tmp_path / 'cache'}", *extra])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert re.search(rf"\bsteps={int(nfe)}\b", out.out) and re.search(r"^\s+fd_digits\s+\d", out.out, re.M), out.out
    # a checkpoint that is not a flow map: one line, exit 2, naming the setting
    assert main(["evaluate", str(teacher.checkpoint), "sampler.method=flow_map"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sampler.method=flow_map needs a flow-map model" in err and "\n" not in err


@pytest.mark.timeout(1800)
def test_flow_map_trains_on_zero3_with_the_finite_difference_fallback(ray_local, digits_shards, tmp_path):
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.sampling import sample_classes
    from pipeline.train.checkpoint import load_trained, read_meta
    from pipeline.train.trainer import fit

    import torch

    over = _flow_map_overrides(digits_shards, tmp_path, run_name="fm3", **{
        "train.zero_stage": 3, "flow_map.jvp": "finite_difference", "train.steps": 3})
    result = fit(load_config(TrainJobConfig, "train", over))
    assert read_meta(result.checkpoint)["step"] == 3 and math.isfinite(result.metrics["loss"])
    trained = load_trained(result.checkpoint)
    out = sample_classes(trained, torch.arange(3), seed=0)
    assert out.nfe == 1 and torch.isfinite(out.x).all()


def _zero3_target_rank(rank: int, init_file: str) -> dict:
    """On a ZeRO-3 engine with bf16 torch_autocast (2 ranks, each holding half the weights): the objective's
    u and MeanFlow target (finite difference) on the same batch on both ranks, and an optimizer step's loss."""
    import os

    import torch
    import torch.distributed as dist

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.flow_map.objective import FlowMapObjective
    from pipeline.models import build_model
    from pipeline.train.engine import build_engine

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = load_config(TrainJobConfig, "train", [
            "model.hidden_size=64", "model.depth=3", "model.num_heads=4", "objective.name=flow_map",
            "sampler.method=flow_map", "train.zero_stage=3", "train.precision=bf16", "train.num_workers=2",
            "flow_map.jvp=finite_difference", "model.class_dropout_prob=0"])
        torch.manual_seed(0)
        model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        full = {k: v.clone() for k, v in model.state_dict().items()}
        engine = build_engine(model, cfg.train, micro_batch=16, world_size=2)
        owned = sum(p.ds_tensor.numel() for p in engine.module.parameters())
        objective = FlowMapObjective(cfg, 10)
        gen = torch.Generator().manual_seed(7)
        x1, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        s = torch.rand(16, generator=gen) * 0.5
        r = s + 0.4
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u, target = objective._meanflow(engine, x1, y, s, r)
            loss = objective.loss(engine, {"image": x1, "label": y})
        engine.backward(loss)
        engine.step()
        return {"full": full, "u": u.detach().float(), "target": target, "x1": x1, "y": y, "s": s, "r": r,
                "owned": owned, "loss": float(loss)}
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_zero3_finite_difference_target_under_bf16_equals_an_fp32_jvp(tmp_path):
    """The MeanFlow target computed on ZeRO-3 partitioned weights under bf16 torch_autocast (the GPU default; the
    finite difference of the bare module in fp32) equals, within 5e-2, the target of an fp32 torch.func.jvp on the
    full weights, on both ranks; the same step's loss is finite and the weights are really partitioned."""
    import torch

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.flow_map.objective import FlowMapObjective
    from pipeline.models import build_model

    results = run_ranks(_zero3_target_rank, (str(tmp_path / "init"),), nprocs=2, out_dir=tmp_path / "out")
    cfg = load_config(TrainJobConfig, "train", [
        "model.hidden_size=64", "model.depth=3", "model.num_heads=4", "objective.name=flow_map",
        "sampler.method=flow_map", "model.class_dropout_prob=0"])
    for rank in (0, 1):
        res = results[rank]
        model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
        model.load_state_dict(res["full"])
        total = sum(p.numel() for p in model.parameters())
        assert res["owned"] <= 0.55 * total, (res["owned"], total)
        objective = FlowMapObjective(cfg, 10)  # jvp=func, fp32
        torch.manual_seed(11)
        u, exact = objective._meanflow(model, res["x1"], res["y"], res["s"], res["r"])
        err = float((res["target"] - exact).norm() / exact.norm())
        assert err <= 5e-2, (rank, err)
        assert float((res["u"] - u.detach()).norm() / u.detach().norm()) <= 5e-2
        assert math.isfinite(res["loss"])
    assert torch.equal(results[0]["target"], results[1]["target"])  # both ranks: the same batch, the same target
