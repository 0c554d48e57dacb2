"""The audit gate: a privacy-stage checkpoint leaves the stage (sample grid, `flowrail register`) only after a
passing audit of those very weights, or an override recorded on the run and the version."""
from __future__ import annotations

import json

import pytest

from cli_output import flowrail_lines
from privacy.gate import AUDIT_FILE, AuditGateError, audit_status, require_audit_passed, write_audit_record


def _checkpoint(path, privacy: bool, run_id: str | None = None, release: str | None = None):
    """The two files of a flowrail checkpoint the gate reads (flowrail.json, ema.safetensors)."""
    from safetensors.torch import save_file
    import torch

    path.mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, str(path / "ema.safetensors"))
    meta = {"format": "flowrail-checkpoint/1", "step": 30, "config": {}, "mlflow_run_id": run_id}
    if privacy:
        meta["privacy"] = {"method": "sfbd_flow", **({"release": release} if release else {})}
    (path / "flowrail.json").write_text(json.dumps(meta))
    return path


def tiny_release(root, monkeypatch, n: int = 20):
    """A marked 8x8 sensitive set of ``n`` random images and its release, in a ledger of its own; returns
    ``(release_dir, release_id)``."""
    import hashlib

    import numpy as np

    from pipeline.data.shards import write_shard_set
    from privacy.boundary import mark_sensitive
    from privacy.release import release

    monkeypatch.setenv("FLOWRAIL_PRIVACY_LEDGER", str(root / "ledger"))
    rng = np.random.default_rng(0)
    write_shard_set(root / "sensitive", ((f"s{i:03d}", {"image.npy": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
                                                         "cls": 0}) for i in range(n)),
                    samples_per_shard=64, extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8],
                                                 "num_classes": 1})
    mark_sensitive(root / "sensitive")
    out = release(root / "sensitive", root / "release", 0.59, secret=hashlib.sha256(b"gate tests").digest())
    return out.out_dir, out.manifest["release_id"]


def test_gate_needs_a_passing_audit_of_these_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import torch

    rel, rid = tiny_release(tmp_path, monkeypatch)
    plain = _checkpoint(tmp_path / "plain", privacy=False)
    assert require_audit_passed(plain) == {}  # not a privacy-stage checkpoint: the gate does not apply
    ckpt = _checkpoint(tmp_path / "ckpt", privacy=True, release=str(rel))
    with pytest.raises(AuditGateError, match="audit is missing; run `flowrail privacy audit") as err:
        require_audit_passed(ckpt)
    assert "\n" not in str(err.value)
    write_audit_record(ckpt, {"passed": True, "gen_released_extracted_frac": 0.0}, rid)
    assert require_audit_passed(ckpt) == {"privacy.audit": "passed"}
    save_file({"w": torch.arange(4.0) + 1}, str(ckpt / "ema.safetensors"))  # weights changed after the audit
    assert audit_status(ckpt) == "stale"
    with pytest.raises(AuditGateError, match="audit is stale"):
        require_audit_passed(ckpt)
    other = _checkpoint(tmp_path / "other", privacy=True, release=str(rel))  # a record copied from another ckpt
    (other / AUDIT_FILE).write_bytes((ckpt / AUDIT_FILE).read_bytes())
    save_file({"w": torch.arange(4.0) * 3}, str(other / "ema.safetensors"))
    with pytest.raises(AuditGateError, match="stale"):
        require_audit_passed(other)
    failing = _checkpoint(tmp_path / "failing", privacy=True, release=str(rel))
    write_audit_record(failing, {"passed": False, "gen_released_extracted_frac": 0.2}, rid)
    with pytest.raises(AuditGateError, match="audit is failed"):
        require_audit_passed(failing)


def test_register_before_audit_exits_2_and_registers_nothing(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("t")).info.run_id
    ckpt = _checkpoint(tmp_path / "ckpt", privacy=True, run_id=run_id)
    assert main(["register", str(ckpt), "--name", "faces", "--tracking-uri", uri]) == 2
    ours = flowrail_lines(capsys.readouterr().err)
    assert len(ours) == 1 and ours[0].startswith("flowrail register: ") and "whose audit is missing" in ours[0], ours
    assert c.search_registered_models() == [] and "privacy.audit_override" not in c.get_run(run_id).data.tags

    tags = require_audit_passed(ckpt, override=True, tracking_uri=uri)  # what `register --override-privacy-audit` does
    assert tags == {"privacy.audit": "missing", "privacy.audit_override": "true"}
    assert c.get_run(run_id).data.tags["privacy.audit_override"] == "true"


def test_evaluate_before_audit_exits_2_and_logs_nothing(tmp_path, capsys):
    """`flowrail evaluate` would log a sample grid of the model to MLflow: the gate stops it before sampling."""
    from jobs.cli import main

    ckpt = _checkpoint(tmp_path / "ckpt", privacy=True)
    run_dir = tmp_path / "evalruns"
    assert main(["evaluate", str(ckpt), f"run_dir={run_dir}"]) == 2
    err = flowrail_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("flowrail evaluate: ") and "whose audit is missing" in err[0], err
    assert not run_dir.exists()  # no MLflow store, no grid


def test_lineage_reads_the_privacy_marker_of_init_from_and_of_the_teacher(tmp_path):
    """``inherited_privacy``: nothing for a plain ancestor; the stage's section, the nearest ancestor and the chain
    for a privacy-stage one, whether it is ``init_from`` or the flow-map teacher; a grandchild keeps the chain."""
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.init_from import inherited_privacy

    plain, private = _checkpoint(tmp_path / "plain", privacy=False), _checkpoint(tmp_path / "private", privacy=True)

    def cfg(*overrides: str) -> TrainJobConfig:
        return load_config(TrainJobConfig, None, list(overrides))

    assert inherited_privacy(cfg()) == {} and inherited_privacy(cfg(f"init_from={plain}")) == {}
    got = inherited_privacy(cfg(f"init_from={private}"))["privacy"]
    assert got["method"] == "sfbd_flow" and got["inherited_from"] == str(private) and got["lineage"] == [str(private)]
    teacher = inherited_privacy(cfg(f"init_from={plain}", "objective.name=flow_map", "flow_map.target=teacher",
                                    f"flow_map.teacher={private}"))
    assert teacher["privacy"]["inherited_from"] == str(private)

    child = _checkpoint(tmp_path / "child", privacy=False)
    meta = json.loads((child / "flowrail.json").read_text())
    (child / "flowrail.json").write_text(json.dumps({**meta, **inherited_privacy(cfg(f"init_from={private}"))}))
    grandchild = inherited_privacy(cfg(f"init_from={child}"))["privacy"]
    assert grandchild["lineage"] == [str(child), str(private)] and grandchild["method"] == "sfbd_flow"


@pytest.mark.slow
def test_a_model_fine_tuned_from_a_privacy_checkpoint_keeps_the_gate(trained_digits, digits_shards, tmp_path,
                                                                      capsys):
    """Fine-tuning (``init_from``) a privacy-stage checkpoint: the new run's checkpoints carry the marker, so
    ``flowrail register`` refuses them until they are audited."""
    import shutil

    from conftest import tiny_train_overrides
    from jobs.cli import main
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.checkpoint import read_meta
    from pipeline.train.trainer import fit

    _, result = trained_digits
    private = tmp_path / "private"
    shutil.copytree(result.checkpoint, private)
    meta = json.loads((private / "flowrail.json").read_text())
    (private / "flowrail.json").write_text(json.dumps({**meta, "privacy": {"method": "sfbd_flow", "release": "r1"}}))

    cfg = load_config(TrainJobConfig, "train", tiny_train_overrides(digits_shards, tmp_path, run_name="finetune", **{
        "init_from": str(private), "train.steps": 2, "train.checkpoint_every": 2, "train.num_workers": 1,
        "train.eval_every": 0}))
    tuned = fit(cfg).checkpoint
    section = read_meta(tuned)["privacy"]
    assert section["inherited_from"] == str(private) and section["release"] == "r1"
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    capsys.readouterr()
    assert main(["register", str(tuned), "--name", "tuned", "--tracking-uri", uri]) == 2
    err = flowrail_lines(capsys.readouterr().err)
    assert len(err) == 1 and "privacy-stage checkpoint whose audit is missing" in err[0], err
