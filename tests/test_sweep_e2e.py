"""End to end on latent data: digits encoded by a small real AutoencoderKL (random weights) into latent shards ->
a 4-trial Tune sweep (linear/gvp x velocity/score) with ASHA, checkpoints scored by Ray tasks on decoded images ->
a TPE search over sampling choices (>= 4 configurations) -> best_config.yaml -> registration through the promotion
gate; the champion loads in a fresh process and returns RGB images of its signature's shape. A second, worse sweep
leaves @champion where it was and becomes @challenger."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml


@pytest.fixture(scope="module")
def latent_digits(ray_local, digits_shards, tmp_path_factory):
    """Digits train/val shards encoded to 4x4x4 latents by a tiny random AutoencoderKL (through `flowrail encode`)."""
    from diffusers import AutoencoderKL

    from jobs.cli import main

    import torch

    root = tmp_path_factory.mktemp("latent-digits")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(root / "vae")
    for split in ("train", "val"):
        assert main(["encode", "--vae", str(root / "vae"), "--src", str(digits_shards / split), "--out",
                     str(root / split), "--batch-size", "256", "--samples-per-shard", "1024"]) == 0
    return root


def _sweep_yaml(tmp_path, shards, uri, name, worse=False) -> str:
    cfg = {
        "name": name,
        "base": "train",
        "overrides": {
            "run_dir": str(tmp_path / "runs"), "data.shards": str(shards / "train"),
            "data.val_shards": str(shards / "val"), "data.batch_size": 32, "model.hidden_size": 32,
            "model.depth": 2, "model.num_heads": 2, "model.patch_size": 2, "train.num_workers": 1,
            "train.cpus_per_worker": 0.5, "train.steps": 20, "train.log_every": 10, "train.checkpoint_every": 10,
            "train.keep_checkpoints": 1, "train.lr": 3e-3, "sampler.steps": 6, "samples.per_class": 2,
            "tracking.tracking_uri": uri, "tracking.experiment": "sweep-e2e",
        },
        "space": {"transport.path": {"grid": ["linear", "gvp"]},
                  "transport.prediction": {"grid": ["velocity", "score"]}},
        "tune": {"metric": "fd_pixels", "mode": "min", "max_concurrent": 1,
                 "asha": {"grace_period": 10, "reduction_factor": 2}},
        "eval": {"metrics": ["fd_pixels"], "num_samples": 256},  # > 192 decoded dimensions: a full-rank covariance
        "sampling": {"top_k": 1, "searcher": "optuna", "num_samples": 3,
                     "configs": [{"name": "euler4", "sampler": {"method": "ode", "solver": "euler", "steps": 4}}],
                     "space": {"sampler.method": {"choice": ["ode", "sde"]},
                               "sampler.solver": {"choice": ["euler", "heun"]},
                               "sampler.steps": {"randint": [3, 9]},
                               "sampler.diffusion": {"choice": ["sigma", "linear", "sbdm"]},
                               "sampler.diffusion_norm": {"uniform": [0.2, 2.0]},
                               "guidance.scale": {"uniform": [1.0, 3.0]},
                               "guidance.t_max": {"uniform": [0.6, 1.0]}}},
        "registry": {"enabled": True, "name": "flowrail-latent-e2e"},
    }
    if worse:  # one barely trained trial, no sampling search: its best is worse than the first sweep's
        cfg["overrides"].update({"train.steps": 2, "train.checkpoint_every": 2, "train.lr": 1e-5})
        cfg["space"] = {"transport.path": {"grid": ["linear"]}}
        cfg["tune"]["asha"] = {"enabled": False}
        cfg["sampling"] = {"top_k": 1, "num_samples": 0}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


LOAD_AND_PREDICT = textwrap.dedent("""
    import json, sys
    import mlflow, numpy as np, pandas as pd
    from mlflow.models import get_model_info
    model = mlflow.pyfunc.load_model("models:/flowrail-latent-e2e@champion")
    frame = pd.DataFrame({"label": [0, 3, 7, 3], "seed": [5, 5, 5, 9], "steps": [4, 4, 4, 4]})
    a = model.predict(frame)
    b = model.predict(frame)
    spec = get_model_info("models:/flowrail-latent-e2e@champion").signature.outputs.to_dict()[0]["tensor-spec"]
    print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "same": bool((a == b).all()),
                      "spec": spec["shape"], "seed_matters": bool((a[1] != a[3]).any()),
                      "loaded_from": sys.modules["pipeline"].__file__}))
""")


@pytest.mark.slow
@pytest.mark.timeout(3000)  # 5 small Ray Train runs and a sampling search; long on a loaded 2-core machine
def test_latent_sweep_registers_champion_gate_holds_against_worse_run(latent_digits, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main as cli

    assert cli(["sweep", _sweep_yaml(tmp_path, latent_digits, mlflow_server, "e2e")]) == 0
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("sweep-e2e")
    (parent,) = [r.info.run_id for r in c.search_runs([exp.experiment_id], "tags.`flowrail.sweep` = 'e2e' and "
                                                                           "tags.`flowrail.job` = 'sweep'")]
    trials = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {(t.data.params["transport.path"], t.data.params["transport.prediction"]) for t in trials} == {
        ("linear", "velocity"), ("linear", "score"), ("gvp", "velocity"), ("gvp", "score")}
    status = {t.info.run_id: t.data.tags["flowrail.trial_status"] for t in trials}
    assert "stopped" in status.values(), f"ASHA stopped no trial: {status}"
    completed = [t for t in trials if status[t.info.run_id] == "completed"]
    for t in completed:  # every checkpoint scored on decoded images (no swallowed shape error)
        assert len(c.get_metric_history(t.info.run_id, "eval_fd_pixels")) == 2

    sampling = c.search_runs([exp.experiment_id], f"tags.`flowrail.job` = 'sweep_sampling' and "
                                                  f"tags.`flowrail.sweep_parent` = '{parent}'")
    assert len(sampling) >= 4 and all(s.data.metrics["fd_pixels"] > 0 for s in sampling)
    assert {s.data.tags["mlflow.parentRunId"] for s in sampling} <= {t.info.run_id for t in completed}
    assert len({s.data.params["sampler.diffusion_norm"] for s in sampling}) >= 3  # searched, not a fixed list
    best_yaml = c.download_artifacts(parent, "best/best_config.yaml", str(tmp_path))
    best = yaml.safe_load(open(best_yaml))
    assert best["metric"]["name"] == "fd_pixels" and best["train"]["sampler"] == best["sampler"]
    assert best["train"]["tracking"]["tracking_uri"] is None

    champion = c.get_model_version_by_alias("flowrail-latent-e2e", "champion")
    # registered through the gate: the selection number is recorded, the gate's own (held-out half, its 2 seeds) too
    assert float(champion.tags["flowrail.selection_fd_pixels"]) == pytest.approx(best["metric"]["value"], rel=1e-6)
    assert len(json.loads(champion.tags["flowrail.metric_values"])) == 2
    assert json.loads(champion.tags["flowrail.protocol"])["split"] == "gate" and best["metric"]["split"] == "select"
    assert champion.tags["flowrail.family"] == "latent" and "Sampler" in champion.description

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [4, 8, 8, 3] and out["spec"] == [-1, 8, 8, 3] and out["dtype"] == "uint8"
    assert out["same"] and out["seed_matters"] and "/code/pipeline/" in out["loaded_from"]

    # a worse sweep: registered, but @champion stays and the new version is @challenger, both numbers recorded
    assert cli(["sweep", _sweep_yaml(tmp_path, latent_digits, mlflow_server, "e2e-worse", worse=True)]) == 0
    assert c.get_model_version_by_alias("flowrail-latent-e2e", "champion").version == champion.version
    challenger = c.get_model_version_by_alias("flowrail-latent-e2e", "challenger")
    assert challenger.version != champion.version
    assert float(challenger.tags["flowrail.metric_value"]) > float(champion.tags["flowrail.metric_value"])
    # the champion was re-scored beside it: same weights, seeds and samples give its own gate number again
    assert float(challenger.tags["flowrail.champion_metric_value"]) == pytest.approx(
        float(champion.tags["flowrail.metric_value"]), rel=1e-3)
