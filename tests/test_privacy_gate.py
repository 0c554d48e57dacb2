"""The audit gate: a privacy-stage checkpoint leaves the stage (sample grid, `flowrail register`) only after a
passing audit of those very weights, or an override recorded on the run and the version."""
from __future__ import annotations

import json

import pytest

from cli_output import flowrail_lines
from privacy.gate import AUDIT_FILE, AuditGateError, audit_status, require_audit_passed, write_audit_record


def _checkpoint(path, privacy: bool, run_id: str | None = None):
    """The two files of a flowrail checkpoint the gate reads (flowrail.json, ema.safetensors)."""
    from safetensors.torch import save_file
    import torch

    path.mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, str(path / "ema.safetensors"))
    meta = {"format": "flowrail-checkpoint/1", "step": 30, "config": {}, "mlflow_run_id": run_id}
    if privacy:
        meta["privacy"] = {"method": "sfbd_flow"}
    (path / "flowrail.json").write_text(json.dumps(meta))
    return path


def test_gate_needs_a_passing_audit_of_these_weights(tmp_path):
    from safetensors.torch import save_file
    import torch

    plain = _checkpoint(tmp_path / "plain", privacy=False)
    assert require_audit_passed(plain) == {}  # not a privacy-stage checkpoint: the gate does not apply
    ckpt = _checkpoint(tmp_path / "ckpt", privacy=True)
    with pytest.raises(AuditGateError, match="audit is missing; run `flowrail privacy audit") as err:
        require_audit_passed(ckpt)
    assert "\n" not in str(err.value)
    write_audit_record(ckpt, {"passed": False, "gen_released_extracted_frac": 0.2})
    with pytest.raises(AuditGateError, match="audit is failed"):
        require_audit_passed(ckpt)
    write_audit_record(ckpt, {"passed": True, "gen_released_extracted_frac": 0.0})
    assert require_audit_passed(ckpt) == {"privacy.audit": "passed"}
    save_file({"w": torch.arange(4.0) + 1}, str(ckpt / "ema.safetensors"))  # weights changed after the audit
    assert audit_status(ckpt) == "stale"
    with pytest.raises(AuditGateError, match="audit is stale"):
        require_audit_passed(ckpt)
    other = _checkpoint(tmp_path / "other", privacy=True)  # a passing record copied from another checkpoint
    (other / AUDIT_FILE).write_bytes((ckpt / AUDIT_FILE).read_bytes())
    save_file({"w": torch.arange(4.0) * 3}, str(other / "ema.safetensors"))
    with pytest.raises(AuditGateError, match="stale"):
        require_audit_passed(other)


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
