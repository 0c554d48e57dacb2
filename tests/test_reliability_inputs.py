"""Bad input: each gives one line naming the thing (CLI exit code 2) or a documented skip policy with counts.

The table in docs/RELIABILITY.md lists every case tried here."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_output import flowrail_lines
from conftest import tiny_train_overrides
from pipeline.data.shards import write_shard_set
from pipeline.data.streaming import DataInfo, epoch_dataset, name_bad_shard
from pipeline.errors import CheckpointError, DataError


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from jobs.cli import main

    code = main(args)
    return code, flowrail_lines(capsys.readouterr().err)


def _copy_train(digits_shards: Path, dest: Path) -> Path:
    shutil.copytree(digits_shards / "train", dest)
    return dest


def test_truncated_shard_is_named_before_training(digits_shards, tmp_path, capsys):
    shards = _copy_train(digits_shards, tmp_path / "train")
    bad = shards / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated mid-member
    code, err = _cli(["train", *tiny_train_overrides(digits_shards, tmp_path, **{"data.shards": str(shards)})], capsys)
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and "sha256" in err[0], err


def test_corrupt_shard_while_streaming_is_named(ray_local, digits_shards, tmp_path):
    """Without the checksum pass (data.verify_checksums=false) a read error still names the shard."""
    shards = _copy_train(digits_shards, tmp_path / "train")
    bad = shards / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[:40600])  # cut inside a member's data
    paths = sorted(str(p) for p in shards.glob("*.tar"))
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=1438)
    errors = []
    for rank in (0, 1):
        ds, files = epoch_dataset(paths, info, policy="skip", seed=0, epoch=0, rank=rank, world=2)
        try:
            for _ in ds.iter_torch_batches(batch_size=64):
                pass
        except Exception as exc:  # noqa: BLE001 - what the worker turns into a DataError
            errors.append(name_bad_shard(files, exc))
    assert len(errors) == 1 and str(bad) in str(errors[0]) and "\n" not in str(errors[0]), errors


def test_empty_and_missing_shard_sets(digits_shards, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"shards": [], "num_samples": 0}))
    code, err = _cli(["train", *tiny_train_overrides(digits_shards, tmp_path, **{"data.shards": str(empty)})], capsys)
    assert code == 2 and len(err) == 1 and "is empty" in err[0] and str(empty) in err[0], err
    code, err = _cli(["train", *tiny_train_overrides(digits_shards, tmp_path,
                                                     **{"data.shards": str(tmp_path / "nowhere")})], capsys)
    assert code == 2 and len(err) == 1 and "no shard set at" in err[0], err


def test_epoch_file_split_is_deterministic_and_handles_fewer_shards_than_workers():
    from pipeline.data.streaming import batch_stride, epoch_files

    paths = [f"s{i}.tar" for i in range(6)]
    split = [epoch_files(paths, seed=3, epoch=1, rank=r, world=2) for r in (0, 1)]
    assert sorted(split[0] + split[1]) == paths and not set(split[0]) & set(split[1])
    assert split == [epoch_files(paths, seed=3, epoch=1, rank=r, world=2) for r in (0, 1)]  # same (seed, epoch)
    assert split != [epoch_files(paths, seed=3, epoch=2, rank=r, world=2) for r in (0, 1)]  # reshuffled per epoch
    assert batch_stride(6, 2) == 1
    # 2 files, 3 workers: every rank reads both files and keeps every 3rd batch
    few = [epoch_files(paths[:2], seed=3, epoch=0, rank=r, world=3) for r in range(3)]
    assert all(sorted(f) == paths[:2] for f in few) and few[0] == few[1] == few[2] and batch_stride(2, 3) == 3


def _bad_sample_set(root: Path) -> Path:
    """16 good 8x8 samples, one of wrong shape, one without its image, one with NaN pixels, one whose .npy member
    is garbled inside an intact tar."""
    rng = np.random.default_rng(0)
    samples = [(f"good{i:03d}", {"image.npy": rng.integers(0, 255, (8, 8, 1), dtype=np.uint8), "cls": i % 10})
               for i in range(16)]
    samples.insert(3, ("wrongshape", {"image.npy": rng.integers(0, 255, (8, 6, 1), dtype=np.uint8), "cls": 1}))
    samples.insert(7, ("nofield", {"cls": 2}))
    nan = rng.random((8, 8, 1)).astype(np.float32)
    nan[2, 2, 0] = np.nan
    samples.insert(11, ("nanpixels", {"image.npy": nan, "cls": 3}))
    samples.insert(15, ("garbled", {"image.npy": b"\x93NUMPY\x01\x00garbage, not an array header" + bytes(40),
                                    "cls": 4}))
    write_shard_set(root, samples, samples_per_shard=100,
                    extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "dtype": "uint8",
                           "num_classes": 10})
    return root


def test_bad_samples_skipped_and_counted_or_fail(ray_local, tmp_path):
    root = _bad_sample_set(tmp_path / "bad")
    paths = [str(p) for p in sorted(root.glob("*.tar"))]
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=20)
    ds, _ = epoch_dataset(paths, info, policy="skip", seed=0, epoch=0, rank=0, world=1)
    rows = list(ds.iter_torch_batches(batch_size=100))
    assert sum(b["image"].shape[0] for b in rows) == 16
    assert sum(int(b["skipped"].sum()) for b in rows) == 4  # the count the worker logs as skipped_samples
    assert all(torch.isfinite(b["image"]).all() for b in rows)

    ds, files = epoch_dataset(paths, info, policy="fail", seed=0, epoch=0, rank=0, world=1)
    with pytest.raises(Exception) as err:  # noqa: PT011 - Ray wraps the task's DataError
        list(ds.iter_torch_batches(batch_size=100))
    from pipeline.train.worker import _user_error

    user = _user_error(err.value)
    assert isinstance(user, DataError) and "sample wrongshape" in str(user) and "does not match" in str(user)


@pytest.mark.slow
def test_too_few_valid_samples_for_a_batch(ray_local, tmp_path, capsys):
    """16 valid samples (4 bad ones skipped) cannot fill one batch of 32: the worker stops with one line."""
    from jobs.cli import main

    root = _bad_sample_set(tmp_path / "bad")
    code = main(["train", *tiny_train_overrides(root.parent, tmp_path, **{
        "data.shards": str(root), "data.val_shards": str(root), "train.num_workers": 1, "train.steps": 2})])
    err = flowrail_lines(capsys.readouterr().err, "flowrail train:")
    assert code == 2 and len(err) == 1, err
    assert f"an epoch of {root} gave worker 0 no full batch of 32 samples" in err[0], err


@pytest.mark.parametrize("override, needle", [
    ("train.lr=-1", "train.lr=-1"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("train.ema_decay=1.5", "train.ema_decay=1.5"),
    ("train.max_bad_steps=-3", "train.max_bad_steps=-3"),
])
def test_config_value_out_of_range(override, needle):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", override], capture_output=True, text=True,
                          timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_early(digits_shards, tmp_path, capsys):
    uri = f"http://user:hunter2@127.0.0.1:{_closed_port()}"
    code, err = _cli(["train", *tiny_train_overrides(digits_shards, tmp_path, **{
        "tracking.tracking_uri": uri, "tracking.on_unreachable": "fail"})], capsys)
    assert code == 2 and len(err) == 1 and "is unreachable" in err[0], err
    assert "hunter2" not in err[0] and "http://***@127.0.0.1" in err[0]  # credentials are not printed


def test_missing_and_incompatible_checkpoints(trained_digits, tmp_path):
    from pipeline.config import TrainJobConfig
    from pipeline.train.checkpoint import load_trained
    from pipeline.train.worker_setup import build_worker_model

    cfg, result = trained_digits
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "nope")
    wider = TrainJobConfig.model_validate({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "hidden_size": 64}})
    with pytest.raises(CheckpointError, match=r"does not fit model 'sit': .*size mismatch"):
        load_trained(result.checkpoint, overrides=wider)
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=1)
    wider.init_from = str(result.checkpoint)
    with pytest.raises(CheckpointError, match="init_from=.*does not fit the model"):
        build_worker_model(wider, info)
    # a damaged checkpoint: metadata that is not JSON
    broken = tmp_path / "broken"
    shutil.copytree(result.checkpoint, broken)
    (broken / "flowrail.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_trained(broken)


def test_missing_init_from_fails_before_training(digits_shards, tmp_path, capsys):
    code, err = _cli(["train", *tiny_train_overrides(digits_shards, tmp_path, init_from=str(tmp_path / "none.pt"))],
                     capsys)
    assert code == 2 and len(err) == 1 and "init_from=" in err[0] and "does not exist" in err[0], err
