"""Registry handoff on a real MLflow server: `flowrail register` logs a pyfunc image generator with signature,
input example and pinned requirements, registers versions under aliases, and the model loads in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cli_output import flowrail_lines


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("registry-ckpt"))


def make_checkpoint(root):
    """A flowrail checkpoint's sampling part (flowrail.json + ema.safetensors) for a tiny untrained SiT."""
    from safetensors.torch import save_file

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.models import build_model
    from pipeline.train.checkpoint import EMA_FILE, META

    cfg = load_config(TrainJobConfig, "train", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                                "data.image_size=8", "sampler.steps=3", f"run_dir={root}"])
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=100)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10, flux_cfg=cfg.flux)
    with torch.no_grad():  # SiT zero-initialises its output layer: perturb so the velocity field is not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = root / "checkpoint_000001"
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / EMA_FILE))
    (ckpt / META).write_text(json.dumps({"format": "flowrail-checkpoint/1", "step": 7, "epoch": 0,
                                         "config": cfg.model_dump(mode="json"), "data": info.to_dict()}))
    return ckpt


PREDICT = textwrap.dedent("""
    import json, sys
    import mlflow, pandas as pd
    import numpy as np
    model = mlflow.pyfunc.load_model(sys.argv[1])
    frame = pd.DataFrame({"label": [1, 4, 4], "seed": [3, 3, 3], "steps": [3, 3, 3], "solver": ["heun"] * 3})
    images = model.predict(frame)
    np.save(sys.argv[2], images)
    print(json.dumps({"pipeline": sys.modules["pipeline"].__file__,
                      "inputs": model.metadata.get_input_schema().input_names()}))
""")


def _expected(checkpoint, labels, seed, **sampler):
    """The same images drawn in-process through flowrail's own sampler."""
    from pipeline.images import to_uint8
    from pipeline.sampling import sample_classes
    from pipeline.sweep.metric import with_sampler
    from pipeline.train.checkpoint import load_trained

    trained = load_trained(checkpoint)
    model = with_sampler(trained, trained.config.sampler.model_copy(update=sampler), trained.config.guidance)
    return to_uint8(sample_classes(model, torch.tensor(labels), seed).x)


def test_register_checkpoint_and_load_by_alias_in_fresh_process(checkpoint, mlflow_server, tmp_path):
    import numpy as np
    from mlflow.tracking import MlflowClient

    from jobs.cli import main

    rc = main(["register", str(checkpoint), "--name", "reg-test", "--force-champion",
               "--tracking-uri", mlflow_server, "sampler.solver=midpoint"])
    assert rc == 0
    c = MlflowClient(mlflow_server)
    version = c.get_model_version_by_alias("reg-test", "champion")
    assert version.tags["sampler.solver"] == "midpoint" and version.tags["flowrail.step"] == "7"
    assert version.tags["flowrail.promotion"] == "forced"  # moved past the gate by hand: on the record
    run = c.get_run(version.run_id)
    assert run.data.tags["flowrail.job"] == "register" and run.info.status == "FINISHED"

    from mlflow.models import get_model_info

    info = get_model_info("models:/reg-test@champion")
    assert info.signature.inputs.input_names()[0] == "label"
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 8, 8, 1]
    assert info.saved_input_example_info is not None
    reqs = c.download_artifacts(version.run_id, "model/requirements.txt", str(tmp_path))
    pinned = open(reqs).read()
    assert f"torch=={torch.__version__.split('+')[0]}" in pinned and "safetensors==" in pinned

    out = tmp_path / "images.npy"
    proc = subprocess.run([sys.executable, "-c", PREDICT, "models:/reg-test@champion", str(out)], cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/pipeline/" in loaded["pipeline"]  # flowrail's code travels with the model (code_paths)
    images = np.load(out)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    # the rows' solver column overrides the registered default (midpoint); same seed -> same images as in-process
    assert (images == _expected(checkpoint, [1, 4, 4], 3, solver="heun", steps=3)).all()
    assert not (images == _expected(checkpoint, [1, 4, 4], 3, solver="midpoint", steps=3)).all()


def test_register_by_run_id_adds_a_version_and_moves_the_alias(checkpoint, mlflow_server):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("reg-runs") or c.create_experiment("reg-runs")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run = c.create_run(exp_id, tags={"flowrail.checkpoint": str(checkpoint)})
    c.set_terminated(run.info.run_id)
    versions = []
    for _ in range(2):
        assert main(["register", run.info.run_id, "--name", "reg-runid", "--alias", "challenger",
                     "--tracking-uri", mlflow_server]) == 0
        versions.append(c.get_model_version_by_alias("reg-runid", "challenger"))
    assert int(versions[1].version) == int(versions[0].version) + 1
    assert versions[1].run_id == run.info.run_id
    assert c.get_run(run.info.run_id).info.status == "FINISHED"


def test_register_promotes_through_the_gate_and_keeps_the_champion_on_a_tie(checkpoint, mlflow_server, capsys):
    """``--promote-on``: a first version becomes @champion; the same weights, re-scored beside the champion under the
    same protocol, do not beat it (a tie), so the second version is @challenger with both numbers on it."""
    from mlflow.tracking import MlflowClient

    from jobs.cli import main

    c = MlflowClient(mlflow_server)
    gate = ["--promote-on", "fd_digits", "--eval-samples", "40", "--eval-seeds", "3", "4", "--tracking-uri",
            mlflow_server]
    assert main(["register", str(checkpoint), "--name", "reg-gate", *gate]) == 0
    first = c.get_model_version_by_alias("reg-gate", "champion")
    assert first.tags["flowrail.promotion"] == "champion" and first.tags["flowrail.champion_metric_value"] == "none"
    value = float(first.tags["fd_digits"])
    assert value > 0 and "fd_digits" in first.description

    assert main(["register", str(checkpoint), "--name", "reg-gate", *gate]) == 0
    assert "not better beyond the spread" in capsys.readouterr().out  # re-scored together: a tie
    second = c.get_model_version_by_alias("reg-gate", "challenger")
    assert c.get_model_version_by_alias("reg-gate", "champion").version == first.version  # the champion stayed
    assert second.version != first.version and second.tags["flowrail.promotion"] == "challenger"
    assert float(second.tags["flowrail.champion_metric_value"]) == value == float(second.tags["fd_digits"])


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "--alias", "champion"], "--alias champion would skip the promotion gate"),
    (["{ckpt}", "--promote-on", "fd_digits", "--alias", "champion"], "the gate decides"),
    (["{ckpt}", "--promote-on", "fid_score"], "--promote-on fid_score: unknown metric"),
    (["{ckpt}", "--promote-on", "fd_digits", "--eval-seeds", "3"], "needs >= 2"),
    (["no-such-run-or-path"], "neither a checkpoint path nor a run id"),
    (["{ckpt}", "sampler.solver=rk5"], "sampler.solver"),
    (["{ckpt}", "model.depth=3"], "unknown section(s) ['model']"),
])
def test_register_user_errors_exit_2(checkpoint, mlflow_server, capsys, args, message):
    from jobs.cli import main

    argv = [a.format(ckpt=checkpoint) for a in args]
    assert main(["register", argv[0], "--name", "reg-bad", "--tracking-uri", mlflow_server, *argv[1:]]) == 2
    err = flowrail_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
