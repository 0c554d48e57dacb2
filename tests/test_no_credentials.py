"""No credential, and no unsalted hash of one, in a file or a console line: URIs are shown with their user-info
removed and ``sweep.json`` keeps a salted fingerprint of the tracking URI."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
URI = "http://alice:s3cret-pw@mlflow.example.org:5000"


def test_sweep_state_keeps_a_salted_fingerprint_only(tmp_path):
    from pipeline.sweep.state import check_same_store, load_state, save_state

    cfg = SimpleNamespace(name="s", model_dump=lambda mode: {"name": "s"})
    (tmp_path / "tune").mkdir()
    path = save_state(tmp_path, cfg, "parent", tmp_path / "tune", URI)
    text = path.read_text()
    for secret in ("s3cret-pw", "alice", hashlib.sha256(URI.encode()).hexdigest(),
                   hashlib.sha256(b"s3cret-pw").hexdigest()):
        assert secret not in text, secret
    again = save_state(tmp_path, cfg, "parent", tmp_path / "tune", URI).read_text()
    assert again != text  # a fresh salt: the same URI does not give the same value twice (no cross-file matching)
    state = load_state(tmp_path, "s")
    check_same_store(state, URI)  # the same store is recognised
    with pytest.raises(ConfigError) as err:
        check_same_store(state, URI.replace("5000", "5001"))
    assert "s3cret-pw" not in str(err.value) and "***@mlflow.example.org" in str(err.value)


def test_registry_error_names_the_store_without_its_password(monkeypatch, tmp_path):
    import pipeline.tracking
    from pipeline.registry import resolve_checkpoint

    class NoRun:
        def get_run(self, run_id):  # noqa: ANN001, ANN201
            raise RuntimeError("unknown run")

    monkeypatch.setattr(pipeline.tracking, "client", lambda uri: NoRun())
    with pytest.raises(Exception) as err:
        resolve_checkpoint("0123abcd", URI)
    assert "s3cret-pw" not in str(err.value) and "***@mlflow.example.org" in str(err.value)


def _raw_uri_fstrings(path: Path) -> list[str]:
    """f-strings that interpolate a URI variable as it is (not through ``redact``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.JoinedStr) or _allowed(node):
            continue
        for part in node.values:
            if not isinstance(part, ast.FormattedValue):
                continue
            v = part.value
            name = v.id if isinstance(v, ast.Name) else v.attr if isinstance(v, ast.Attribute) else None
            if name in ("uri", "tracking_uri"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _allowed(node: ast.JoinedStr) -> bool:
    """The one raw interpolation allowed: ``mlflow_ui_hint``'s command for a local sqlite:/file: store (no user-info;
    other stores go through ``redact`` there)."""
    first = node.values[0] if node.values else None
    return isinstance(first, ast.Constant) and str(first.value).startswith("mlflow ui --backend-store-uri ")


def test_no_console_line_or_error_interpolates_a_raw_uri():
    raw = [hit for d in ("pipeline", "jobs", "evals", "privacy") for p in sorted((ROOT / d).rglob("*.py"))
           for hit in _raw_uri_fstrings(p)]
    assert not raw, f"URIs shown with their credentials: {raw} (wrap them in pipeline.tracking.redact)"


def test_fingerprint_matches_only_its_value():
    from pipeline.fingerprint import fingerprint_matches, salted_fingerprint

    fp = salted_fingerprint(URI)
    assert fingerprint_matches(URI, fp) and not fingerprint_matches(URI + "x", fp)
    assert not fingerprint_matches(URI, hashlib.sha256(URI.encode()).hexdigest())


def test_the_run_record_keeps_a_salted_fingerprint_and_resumes(tmp_path, monkeypatch):
    from pipeline.config import TrainJobConfig
    from pipeline.tracking import run_record, start_or_resume_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainJobConfig.model_validate({"run_dir": str(tmp_path), "tracking": {"tracking_uri": uri}})
    run_id, resumed = start_or_resume_run(cfg)
    text = run_record(cfg).read_text()
    assert not resumed and hashlib.sha256(uri.encode()).hexdigest() not in text and "pbkdf2-sha256$" in text
    assert start_or_resume_run(cfg) == (run_id, True)  # the same store is recognised from the salted value
