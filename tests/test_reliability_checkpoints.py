"""Checkpoint atomicity: a full disk keeps the previous checkpoint; a half-written or unregistered one is never latest.
Security: weights-only loading everywhere, credentials never in MLflow params, Ray token auth left on."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig, TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError
from pipeline.train import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine_and_ema(ds_process_group):
    """A real world-size-1 DeepSpeed engine (CPU, gloo) with a tiny SiT."""
    from pipeline.models import build_model
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine

    cfg = TrainJobConfig(train=TrainConfig(zero_stage=2), model={"hidden_size": 16, "depth": 1, "num_heads": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
    ema = EMA(model, 0.9)
    engine = build_engine(model, cfg.train, micro_batch=4, world_size=1)
    yield cfg, engine, ema


INFO = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=4)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_full_disk_keeps_previous_checkpoint(engine_and_ema, tmp_path):
    """A real full filesystem: a tmpfs sized for one checkpoint and a half (needs root to mount)."""
    cfg, engine, ema = engine_and_ema
    probe = tmp_path / "probe"
    ckpt_io.save(probe, engine=engine, ema=ema, state=ckpt_io.TrainState(step=1), cfg=cfg, info=INFO, rank=0)
    size = _du(probe)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 4096}",
                              "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        first = ckpt_io.save(disk / "step1", engine=engine, ema=ema, state=ckpt_io.TrainState(step=1), cfg=cfg,
                             info=INFO, rank=0)
        with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step2 at step 2: no space left on device; the previous"):
            ckpt_io.save(disk / "step2", engine=engine, ema=ema, state=ckpt_io.TrainState(step=2), cfg=cfg,
                         info=INFO, rank=0)
        assert not (disk / "step2" / ckpt_io.META).exists()  # the metadata is written last: never half a checkpoint
        assert ckpt_io.find_latest(disk) == first
        assert ckpt_io.read_meta(first)["step"] == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_unregistered_or_incomplete_checkpoint_is_never_latest(trained_digits, tmp_path):
    cfg, result = trained_digits
    run = tmp_path / "run"
    shutil.copytree(result.checkpoint.parent, run)
    registered = ckpt_io.find_latest(run)
    # a checkpoint that a rank was still uploading when it died: complete-looking, higher step, not registered
    ghost = run / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(registered, ghost)
    meta = json.loads((ghost / ckpt_io.META).read_text())
    (ghost / ckpt_io.META).write_text(json.dumps({**meta, "step": 10_000}))
    assert (run / ckpt_io.RAY_SNAPSHOT).is_file()
    assert ckpt_io.find_latest(run) == registered
    # without Ray's record, completeness decides: rank 1's files are missing, so it is not a checkpoint
    (run / ckpt_io.RAY_SNAPSHOT).unlink()
    (ghost / "rng" / "rank1.pt").unlink()
    assert ckpt_io.find_latest(run) != ghost
    (ghost / "rng" / "rank1.pt").write_bytes((registered / "rng" / "rank1.pt").read_bytes())
    assert ckpt_io.find_latest(run) == ghost  # sanity: complete and newest, it is chosen


# ------------------------------------------------------------------------------------------------ security

def _torch_load_calls(source: str) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_every_torch_load_is_weights_only():
    offenders = []
    sources = [p for top in ("pipeline", "jobs", "privacy", "evals", "infra", "benchmarks", "tests")
               for p in (REPO / top).glob("**/*.py")]  # the project's code, not run outputs under runs/
    for path in sources:
        if path.parts[-2] == "tests" and path.name.startswith("test_"):
            continue  # tests may build unsafe files on purpose
        for call in _torch_load_calls(path.read_text(errors="ignore")):
            weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not offenders, offenders


def test_pickle_bearing_weights_are_refused(tmp_path):
    from pipeline.models import build_model
    from pipeline.train.init_from import initialise_from

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": os.system}, evil)  # unpickling would import and hold os.system
    model = build_model(TrainJobConfig(model={"hidden_size": 16, "depth": 1, "num_heads": 2}).model,
                        in_channels=1, input_size=8, num_classes=10)
    with pytest.raises(CheckpointError, match="weights-only"):
        initialise_from(model, str(evil))


def test_credentials_never_in_mlflow_params():
    from pipeline.tracking import loggable_params

    cfg = TrainJobConfig.model_validate({"tracking": {"tracking_uri": "https://alice:s3cr3t@mlflow.example:443"},
                                         "init_from": "s3://KEYID:SECRETKEY@bucket/ckpt"})
    params = loggable_params(cfg)
    assert not any("s3cr3t" in v or "SECRETKEY" in v for v in params.values())
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example:443"
    assert not any(marker in key for key in params for marker in ("password", "token", "secret"))


def test_trained_run_params_hold_no_environment_credentials(trained_digits):
    from mlflow.tracking import MlflowClient

    _, result = trained_digits
    params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    secrets = {v for k, v in os.environ.items() if any(m in k.upper() for m in ("TOKEN", "PASSWORD", "SECRET"))
               and len(v) >= 6}
    assert not [k for k, v in params.items() if any(s in v for s in secrets)]


def test_ray_token_authentication_left_on(ray_local):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ.get("RAY_AUTH_MODE", "token").lower() != "disabled"
    assert is_token_auth_enabled(), "flowrail's init_ray must not switch Ray's token authentication off"
