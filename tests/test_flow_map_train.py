"""Flow maps through the real pipeline (slow tier): distillation of a trained SiT under Ray Train with 2 workers
(ZeRO-2, torch.func.jvp) with checkpoints, resume and MLflow; ZeRO-3 with the finite-difference fallback;
`flowrail evaluate` on flow-map checkpoints, and its one-line refusal on a checkpoint that is not a flow map."""
from __future__ import annotations

import math
import re

import pytest

from conftest import tiny_train_overrides

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
                               **{"flow_map.target": "teacher", "flow_map.ratio": 0.5, "train.steps": 6})
    first = fit(load_config(TrainJobConfig, "train", over))
    assert read_meta(first.checkpoint)["step"] == 6 and math.isfinite(first.metrics["loss"])
    # re-running the same run name with more steps resumes from step 6 (model, optimizer, EMA, data position)
    cfg = load_config(TrainJobConfig, "train", [*over, "train.steps=9"])
    second = fit(cfg)
    assert second.run_id == first.run_id and read_meta(second.checkpoint)["step"] == 9
    client = MlflowClient(tracking_uri(cfg))
    assert [m.value for m in client.get_metric_history(first.run_id, "resumed_from_step")] == [6]
    assert len(client.get_metric_history(first.run_id, "loss")) >= 3
    trained = load_trained(second.checkpoint)
    assert trained.config.objective.name == "flow_map" and trained.objective.__class__.__name__ == "FlowMapObjective"

    # `flowrail evaluate` takes the flow-map checkpoint at any step count, and as a flow model (ODE on u(x, t, t))
    for extra, nfe in ((["sampler.steps=2"], 2.0), (["sampler.method=ode", "sampler.steps=4"], 4.0)):
        rc = main(["evaluate", str(second.checkpoint), "eval.num_samples=20", "eval.metrics=[fd_digits]",
                   f"eval.cache_dir={tmp_path / 'cache'}", *extra])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert f"{int(nfe)} steps" in out.out and re.search(r"^\s+fd_digits\s+\d", out.out, re.M), out.out
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
        "train.zero_stage": 3, "flow_map.jvp": "finite_difference", "flow_map.ratio": 1.0, "train.steps": 3})
    result = fit(load_config(TrainJobConfig, "train", over))
    assert read_meta(result.checkpoint)["step"] == 3 and math.isfinite(result.metrics["loss"])
    trained = load_trained(result.checkpoint)
    out = sample_classes(trained, torch.arange(3), seed=0)
    assert out.nfe == 1 and torch.isfinite(out.x).all()
