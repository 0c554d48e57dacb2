"""Session-wide real components shared by the test suite: one local Ray, digits shards, an MLflow server,
and one small trained run that evaluation/registry tests reuse."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

pytest_plugins = ["s3_server"]  # an S3-compatible server on 127.0.0.1 for the object-store tests (tests/s3_server.py)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# the privacy ledger is content-keyed and global: each test session gets its own, never the user's ~/.flowrail one
os.environ.setdefault("FLOWRAIL_PRIVACY_LEDGER", os.path.join(__import__("tempfile").mkdtemp(prefix="flowrail-ledger-"),
                                                               "ledger"))


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Tests must not leak process-wide state into each other: MLflow's tracking URI (``mlflow.set_tracking_uri``
    also sets the environment variable) and torch's grad mode."""
    import torch

    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    grad = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad)
    _restore_linear_after_zero_init()
    if saved_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _restore_linear_after_zero_init() -> None:
    """``deepspeed.zero.Init`` replaces ``torch.nn.functional.linear`` with its ZeRO-3 autograd Function for the rest of
    the process ("This will persist unless manually reset"); that Function has no forward-mode derivative, so a later
    test's ``torch.func.jvp`` (flow maps) would fail only because an in-process ZeRO-3 test ran before it."""
    ds = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    cls = getattr(ds, "InsertPostInitMethodToModuleSubClasses", None)
    original = getattr(cls, "linear_bk", None)
    if original is not None:
        import torch

        torch.nn.functional.linear = original


@pytest.fixture(scope="session")
def ds_process_group():
    """A world-size-1 gloo process group for in-process DeepSpeed engines, created once for the session
    (DeepSpeed caches its communication backend, so a group must not be destroyed and re-created)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray with 2 CPUs for the whole session."""
    import ray

    from pipeline.train.trainer import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Digits WebDataset shards: ``<dir>/train`` (1438 samples) and ``<dir>/val`` (359)."""
    from pipeline.data.sources import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, samples_per_shard=256)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, local artifact root); yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    yield from run_mlflow_server(root, str(root / "artifacts"))


def run_mlflow_server(root: Path, artifacts_destination: str):
    """Start ``mlflow server`` (sqlite backend in ``root``, proxied artifacts in ``artifacts_destination``: a local
    directory or an ``s3://`` URL), yield its URI once healthy, stop it afterwards."""
    from server_process import serve

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
               artifacts_destination, "--workers", "1"]
    with serve(command, f"{uri}/health", root / "server.log", "mlflow server", healthy=lambda status: status == 200):
        yield uri


def tiny_train_overrides(shards: Path, run_dir: Path, **extra: object) -> list[str]:
    """Overrides for a small, fast training run on the digits shards."""
    base = {
        "run_dir": str(run_dir), "data.shards": str(shards / "train"), "data.val_shards": str(shards / "val"),
        "data.image_size": 8, "data.batch_size": 32, "model.hidden_size": 32, "model.depth": 2,
        "model.num_heads": 2, "model.patch_size": 2, "train.steps": 30, "train.log_every": 5,
        "train.checkpoint_every": 15, "train.lr": 2e-3, "eval.num_samples": 100, "sampler.steps": 8, "samples.per_class": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def trained_digits(ray_local, digits_shards, tmp_path_factory):
    """One finished 2-worker ZeRO-2 run on digits (local sqlite MLflow): ``(cfg, TrainResult)``."""
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    run_dir = tmp_path_factory.mktemp("trained")
    cfg = load_config(TrainJobConfig, "train", tiny_train_overrides(digits_shards, run_dir, run_name="shared",
                                                                     **{"train.eval_every": 15}))
    return cfg, fit(cfg)
