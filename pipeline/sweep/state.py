"""What ``flowrail sweep --resume NAME`` needs: ``<run_dir>/sweeps/<NAME>/sweep.json``, written when a sweep starts.

It holds the sweep config (credentials and the tracking URI removed), the parent MLflow run and the Tune experiment
directory. The tracking store is not in it: on resume it comes from the environment again, and must be the same
store (checked against the URI's salted fingerprint, :mod:`pipeline.fingerprint`: no credential, and no unsalted
hash of one, is written).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

STATE_FILE = "sweep.json"


@dataclass
class SweepState:
    name: str
    config: dict[str, Any]
    parent_run_id: str
    tune_dir: str
    tracking_uri_redacted: str
    tracking_uri_fingerprint: str


def state_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "sweeps" / name / STATE_FILE


def save_state(run_dir: str | Path, cfg: Any, parent: str, tune_dir: Path, uri: str) -> Path:
    from pipeline.fingerprint import salted_fingerprint
    from pipeline.tracking import redact, shareable_config

    path = state_path(run_dir, cfg.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"name": cfg.name, "config": shareable_config(cfg.model_dump(mode="json")), "parent_run_id": parent,
            "tune_dir": str(tune_dir), "tracking_uri_redacted": redact(uri),
            "tracking_uri_fingerprint": salted_fingerprint(uri)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


def load_state(run_dir: str | Path, name: str) -> SweepState:
    """The saved state of sweep ``name`` under ``run_dir``, or a one-line ConfigError naming what is missing."""
    path = state_path(run_dir, name)
    if not path.is_file():
        known = sorted(p.parent.name for p in (Path(run_dir) / "sweeps").glob(f"*/{STATE_FILE}"))
        raise ConfigError(f"--resume {name}: no sweep of that name under {Path(run_dir) / 'sweeps'} "
                          f"(known: {', '.join(known) or 'none'})")
    try:
        data = json.loads(path.read_text())
        if "tracking_uri_sha256" in data:  # a state written before salted fingerprints (read, never written)
            data["tracking_uri_fingerprint"] = data.pop("tracking_uri_sha256")
        state = SweepState(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"--resume {name}: {path} is not a flowrail sweep state ({type(exc).__name__})") from None
    if not Path(state.tune_dir).is_dir():
        raise ConfigError(f"--resume {name}: its Tune experiment {state.tune_dir} is gone")
    return state


def check_same_store(state: SweepState, uri: str) -> None:
    from pipeline.fingerprint import fingerprint_matches
    from pipeline.tracking import redact

    import hashlib

    saved = state.tracking_uri_fingerprint
    legacy = len(saved) == 64 and hashlib.sha256(uri.encode()).hexdigest() == saved  # an older sweep.json
    if not (legacy or fingerprint_matches(uri, saved)):
        raise ConfigError(f"--resume {state.name}: the sweep was tracked at {state.tracking_uri_redacted}, but the "
                          f"tracking URI is now {redact(uri)}; set MLFLOW_TRACKING_URI to the sweep's store")
