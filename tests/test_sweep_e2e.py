"""End to end: a 4-trial Tune sweep (linear/gvp x velocity/score) with ASHA, a 4-configuration sampling sweep,
the ranked summary and the registry handoff on a real MLflow server; the champion loads in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml


def _sweep_yaml(tmp_path, shards, uri) -> str:
    cfg = {
        "name": "e2e",
        "base": "train",
        "overrides": {
            "run_dir": str(tmp_path / "runs"), "data.shards": str(shards / "train"),
            "data.val_shards": str(shards / "val"), "data.image_size": 8, "data.batch_size": 32,
            "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "train.num_workers": 1,
            "train.cpus_per_worker": 0.5, "train.steps": 30, "train.log_every": 10, "train.checkpoint_every": 10,
            "train.keep_checkpoints": 1, "train.lr": 3e-3, "sampler.steps": 6, "samples.per_class": 2,
            "tracking.tracking_uri": uri, "tracking.experiment": "sweep-e2e",
        },
        "space": {"transport.path": {"grid": ["linear", "gvp"]},
                  "transport.prediction": {"grid": ["velocity", "score"]}},
        "tune": {"metric": "fd_pixels", "mode": "min", "max_concurrent": 1,
                 "asha": {"grace_period": 10, "reduction_factor": 2}},
        "eval": {"metrics": ["fd_pixels"], "num_samples": 64},
        "sampling": {"top_k": 1, "configs": [
            {"name": "euler4", "sampler": {"method": "ode", "solver": "euler", "steps": 4}},
            {"name": "heun2", "sampler": {"method": "ode", "solver": "heun", "steps": 2}},
            {"name": "sde8", "sampler": {"method": "sde", "solver": "euler", "steps": 8, "diffusion": "sigma"}},
            {"name": "euler4-cfg2", "sampler": {"method": "ode", "solver": "euler", "steps": 4},
             "guidance": {"scale": 2.0}},
        ]},
        "registry": {"enabled": True, "name": "flowrail-e2e"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


LOAD_AND_PREDICT = textwrap.dedent("""
    import json, sys
    import mlflow, numpy as np, pandas as pd
    model = mlflow.pyfunc.load_model("models:/flowrail-e2e@champion")
    frame = pd.DataFrame({"label": [0, 3, 7, 3], "seed": [5, 5, 5, 9], "steps": [4, 4, 4, 4]})
    a = model.predict(frame)
    b = model.predict(frame)
    print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "same": bool((a == b).all()),
                      "label_matters": bool((a[1] != a[2]).any()), "seed_matters": bool((a[1] != a[3]).any()),
                      "loaded_from": sys.modules["pipeline"].__file__}))
""")


@pytest.mark.slow
def test_sweep_registers_champion_loadable_in_fresh_process(ray_local, digits_shards, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main as cli

    t0 = time.perf_counter()
    assert cli(["sweep", _sweep_yaml(tmp_path, digits_shards, mlflow_server)]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 600, f"sweep took {elapsed:.0f} s"

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("sweep-e2e")
    parents = c.search_runs([exp.experiment_id], "tags.`flowrail.job` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id

    trials = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(trials) == 4
    assert {(t.data.params["transport.path"], t.data.params["transport.prediction"]) for t in trials} == {
        ("linear", "velocity"), ("linear", "score"), ("gvp", "velocity"), ("gvp", "score")}
    status = {t.info.run_id: t.data.tags["flowrail.trial_status"] for t in trials}
    assert "stopped" in status.values(), f"ASHA stopped no trial: {status}"
    completed = [t for t in trials if status[t.info.run_id] == "completed"]
    assert completed
    for t in completed:  # metric curves and the sample grid of a finished trial
        assert len(c.get_metric_history(t.info.run_id, "loss")) >= 3
        assert len(c.get_metric_history(t.info.run_id, "eval_fd_pixels")) == 3
        assert [a.path for a in c.list_artifacts(t.info.run_id, "samples")]
    for t in trials:
        if status[t.info.run_id] == "stopped":
            assert t.info.status == "KILLED"

    sampling = c.search_runs([exp.experiment_id], f"tags.`flowrail.job` = 'sweep_sampling' and "
                                                  f"tags.`flowrail.sweep_parent` = '{parent}'")
    assert len(sampling) == 4
    assert {s.data.tags["mlflow.parentRunId"] for s in sampling} <= {t.info.run_id for t in completed}
    assert {s.data.params["sampler.solver"] for s in sampling} == {"euler", "heun"}
    assert all(s.data.metrics["fd_pixels"] > 0 for s in sampling)
    assert [a.path for a in c.list_artifacts(parent, "summary")] == ["summary/summary.csv"]

    # the champion is the best ranked row of the summary, the challenger another row
    summary = c.download_artifacts(parent, "summary/summary.csv", str(tmp_path))
    lines = [line.split(",") for line in open(summary).read().strip().splitlines()]
    header, rows = lines[0], lines[1:]
    best = dict(zip(header, rows[0]))
    assert best["rank"] == "1"
    fds = [float(dict(zip(header, r))["fd_pixels"]) for r in rows if dict(zip(header, r))["rank"]]
    assert fds == sorted(fds)
    champion = c.get_model_version_by_alias("flowrail-e2e", "champion")
    assert champion.run_id == best["run_id"]
    assert float(champion.tags["fd_pixels"]) == pytest.approx(float(best["fd_pixels"]), rel=1e-4)
    assert champion.tags["flowrail.metric"] == "fd_pixels" and "sampler.solver" in champion.tags
    challenger = c.get_model_version_by_alias("flowrail-e2e", "challenger")
    assert challenger.version != champion.version

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [4, 8, 8, 1] and out["dtype"] == "uint8"
    assert out["same"] and out["label_matters"] and out["seed_matters"]
