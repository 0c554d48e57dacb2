"""Shard sets, checkpoints and MLflow artifacts on an S3-compatible object store (moto's server on 127.0.0.1,
credentials and endpoint from the standard AWS environment only: see tests/s3_server.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_output import flowrail_lines
from conftest import _free_port, run_mlflow_server, tiny_train_overrides
from pipeline.data.shards import iter_samples, read_manifest, write_shard_set
from pipeline.errors import DataError
from s3_server import make_bucket, run_moto


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from jobs.cli import main

    code = main(args)
    return code, flowrail_lines(capsys.readouterr().err)


def _keys(url: str) -> list[str]:
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_shards_cli_writes_a_verified_set_to_the_object_store(s3_digits, digits_shards):
    from pipeline.data.streaming import describe
    from pipeline.data.verify import ensure_verified

    keys = _keys(s3_digits)
    assert any(k.endswith("train/manifest.json") for k in keys) and any(k.endswith("val/verified.json") for k in keys)
    remote, local = read_manifest(f"{s3_digits}/train"), read_manifest(digits_shards / "train")
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]  # same bytes
    paths, info = describe(f"{s3_digits}/train", None)
    assert paths[0].startswith(f"{s3_digits}/train/shard-") and info.num_samples == 1438
    assert ensure_verified(f"{s3_digits}/train", parallel=False) == "cached"  # verified as written: no re-read
    remote_val = [(k, s["image.npy"], s["cls"]) for k, s in iter_samples(f"{s3_digits}/val")]
    local_val = [(k, s["image.npy"], s["cls"]) for k, s in iter_samples(digits_shards / "val")]
    assert [k for k, *_ in remote_val] == [k for k, *_ in local_val]
    assert all(np.array_equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(remote_val, local_val))


def test_remote_set_streams_the_same_batches_as_local(ray_local, s3_digits, digits_shards):
    """The fast tar reader on s3:// URLs: same deterministic per-rank stream as from local disk."""
    from pipeline.data.streaming import describe, epoch_dataset

    def first_batches(shards: str) -> list[tuple[np.ndarray, np.ndarray]]:
        paths, info = describe(shards, None)
        ds, files = epoch_dataset(paths, info, policy="skip", seed=3, epoch=1, rank=1, world=2)
        out = [(b["image"], b["label"]) for b, _ in zip(ds.iter_batches(batch_size=64, batch_format="numpy"),
                                                          range(4))]
        return out

    remote, local = first_batches(f"{s3_digits}/train"), first_batches(str(digits_shards / "train"))
    assert len(remote) == 4
    for (xr, yr), (xl, yl) in zip(remote, local):
        assert np.array_equal(xr, xl) and np.array_equal(yr, yl)


def test_training_stream_carries_uint8_and_the_worker_converts(ray_local, digits_shards):
    """Pixels cross Ray's object store as uint8 (a quarter of float32's bytes); after the worker's conversion the
    batch equals the float stream's (u8 / 127.5 - 1), for the fast reader and for read_webdataset + Decode."""
    import torch

    from pipeline.data.pixels import model_batch
    from pipeline.data.streaming import Decode, describe, epoch_dataset

    paths, info = describe(str(digits_shards / "train"), None)
    ds, files = epoch_dataset(paths, info, policy="skip", seed=0, epoch=0, rank=0, world=1)
    batch = next(iter(ds.iter_torch_batches(batch_size=32)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (32, 1, 8, 8)
    converted = model_batch(batch, info)["image"]
    reference = Decode(info)({"image.npy": np.stack([s["image.npy"] for _, s in _samples_of(files[0], 32)]),
                              "cls": np.array([s["cls"] for _, s in _samples_of(files[0], 32)]),
                              "__key__": np.array([k for k, _ in _samples_of(files[0], 32)])})["image"]
    assert converted.dtype == torch.float32 and torch.equal(converted, torch.from_numpy(reference))
    raw = Decode(info, uint8_size=8)({"image.npy": list(np.zeros((2, 8, 8, 1), np.uint8)), "cls": np.array([0, 1]),
                                      "__key__": np.array(["a", "b"])})["image"]
    assert raw.dtype == np.uint8 and raw.shape == (2, 1, 8, 8)

    # a model size other than the stored one: still uint8 at the stored 8x8 through the object store, resized on the
    # worker to exactly what the float path (resize in the reader) gives
    from dataclasses import replace

    bigger = replace(info, size=16)
    ds, files = epoch_dataset(paths, bigger, policy="skip", seed=0, epoch=0, rank=0, world=1)
    batch = next(iter(ds.iter_torch_batches(batch_size=32)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (32, 1, 8, 8)
    converted = model_batch(batch, bigger)["image"]
    samples = _samples_of(files[0], 32)
    reference = Decode(bigger)({"image.npy": np.stack([s["image.npy"] for _, s in samples]),
                                "cls": np.array([s["cls"] for _, s in samples]),
                                "__key__": np.array([k for k, _ in samples])})["image"]
    assert converted.shape == (32, 1, 16, 16) and torch.equal(converted, torch.from_numpy(reference))
    empty = Decode(bigger, uint8_size=8)({"image.npy": [np.zeros((3, 3), np.uint8)], "cls": np.array([0]),
                                          "__key__": np.array(["bad"])})["image"]  # the one sample is malformed
    assert empty.dtype == np.uint8 and empty.shape == (0, 1, 8, 8)  # concatenates with the stored-size blocks


def _samples_of(shard: str, n: int) -> list[tuple[str, dict]]:
    import tarfile

    from pipeline.data.shards import decode_member

    out: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key, _, name = m.name.partition(".")
            out.setdefault(key, {})[name] = decode_member(name, tar.extractfile(m).read())  # type: ignore[union-attr]
    return list(out.items())[:n]


def test_reference_statistics_of_a_remote_set(s3_digits, digits_shards, tmp_path):
    import torch

    from evals.reference import reference_stats

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    kw = dict(feature_name="pixels", dim=64, image_size=None, max_samples=200)
    mu_r, sig_r = reference_stats(f"{s3_digits}/val", flat, cache_dir=tmp_path / "r", **kw)
    mu_l, sig_l = reference_stats(digits_shards / "val", flat, cache_dir=tmp_path / "l", **kw)
    assert np.allclose(mu_r, mu_l) and np.allclose(sig_r, sig_l)


def test_verification_is_cached_by_manifest_and_redone_when_it_changes(ray_local, digits_shards, tmp_path):
    import shutil

    from pipeline.data.verify import describe_cache, ensure_verified

    shards = tmp_path / "train"
    shutil.copytree(digits_shards / "train", shards)
    assert ensure_verified(str(shards)) == "cached"  # written (and verified) by the shard writer
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["note"] = "edited"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_verified(str(shards), parallel=True) == "verified"  # a new manifest: checked again, in Ray tasks
    assert ensure_verified(str(shards)) == "cached"
    assert describe_cache(str(shards))["manifest_sha256"] != ""
    bad = shards / "shard-000003.tar"
    bad.write_bytes(bad.read_bytes()[:-2048])  # truncated: another size, so the cache does not vouch for it
    with pytest.raises(DataError) as caught:
        ensure_verified(str(shards))
    assert str(bad) in str(caught.value) and "sha256" in str(caught.value) and "\n" not in str(caught.value)


def test_bad_object_store_input_is_one_line(s3_server, s3_digits, digits_shards, tmp_path, capsys, monkeypatch):
    """Missing bucket, unreachable endpoint, a checkpoint store in a missing bucket: exit 2, one line naming it."""
    base = tiny_train_overrides(digits_shards, tmp_path)
    code, err = _cli(["train", *base, "data.shards=s3://no-such-bucket-x/digits/train"], capsys)
    assert code == 2 and len(err) == 1 and "bucket no-such-bucket-x does not exist" in err[0], err
    code, err = _cli(["train", *base, f"data.shards={s3_digits}/train", "train.storage_path=s3://no-such-bucket-y/ray"],
                     capsys)
    assert code == 2 and len(err) == 1 and "train.storage_path=s3://no-such-bucket-y/ray" in err[0], err
    assert "bucket no-such-bucket-y does not exist" in err[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, err = _cli(["shards", "digits", "--out", "s3://some-bucket/digits"], capsys)
    assert code == 2 and len(err) == 1 and "s3://some-bucket/digits" in err[0] and "unreachable" in err[0], err
    assert not (tmp_path / "ray").exists()  # nothing was started or written


def test_wrong_credentials_are_named(tmp_path, monkeypatch):
    """A server that checks credentials (moto with IAM auth on after its first request): refused keys, one line."""
    import boto3

    port = _free_port()
    servers = run_moto(port, tmp_path / "moto-auth.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    endpoint = next(servers)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="locked")  # the one unauthenticated action
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(DataError) as caught:
            write_shard_set("s3://locked/set", [("k0", {"image.npy": np.zeros((8, 8, 1), np.uint8)})],
                            samples_per_shard=4, extra={"shape": [1, 8, 8]})
        assert "s3://locked/set" in str(caught.value) and "access denied" in str(caught.value), caught.value
        assert "\n" not in str(caught.value)
    finally:
        servers.close()


@pytest.fixture(scope="module")
def mlflow_on_s3(s3_server, tmp_path_factory):
    """An ``mlflow server`` (sqlite backend local to it) whose artifact store is a bucket on the S3 server."""
    artifacts = f"{make_bucket('mlflow')}/artifacts"
    for uri in run_mlflow_server(tmp_path_factory.mktemp("mlflow-s3"), artifacts):
        yield uri, artifacts


@pytest.mark.slow
def test_train_resume_checkpoint_and_artifacts_on_the_object_store(ray_local, s3_digits, mlflow_on_s3, tmp_path):
    """2 workers read shards from S3, checkpoint to S3, a second driver resumes from S3, and MLflow's artifacts
    land in S3 — with no local directory holding shards or Ray checkpoints."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.checkpoint import read_meta
    from pipeline.train.trainer import fit

    uri, artifacts = mlflow_on_s3
    storage = f"{make_bucket('ckpt')}/ray"
    overrides = tiny_train_overrides(Path("/nonexistent"), tmp_path, run_name="s3run", **{
        "data.shards": f"{s3_digits}/train", "data.val_shards": f"{s3_digits}/val", "train.num_workers": 2,
        "train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 5, "train.storage_path": storage,
        "tracking.tracking_uri": uri, "samples.per_class": 1})
    first = fit(load_config(TrainJobConfig, "train", overrides), make_grid=False)
    ckpt_keys = [k for k in _keys(f"{storage}/s3run") if k.endswith("flowrail.json")]
    assert len(ckpt_keys) == 2, ckpt_keys  # steps 5 and 10, in the bucket
    local = [p for p in tmp_path.rglob("flowrail.json") if "checkpoints" not in p.parts]
    assert not local, local  # Ray Train's storage is the bucket (run_dir/checkpoints: the driver's final download)

    longer = load_config(TrainJobConfig, "train", [*overrides, "train.steps=15"])
    second = fit(longer, make_grid=True)  # a new driver call: Ray Train restores from the S3 snapshot
    assert second.run_id == first.run_id and read_meta(second.checkpoint)["step"] == 15
    assert not (second.checkpoint / "deepspeed").exists()  # the driver downloaded metadata and EMA only
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(second.run_id, "resumed_from_step")] == [10]
    assert [int(m.value) for m in client.get_metric_history(second.run_id, "resumed_from_step")] == [10]
    assert [m.step for m in sorted(client.get_metric_history(second.run_id, "loss"), key=lambda m: m.step)] == \
        [5, 10, 15]
    artifact_keys = _keys(artifacts)
    assert any(k.endswith(".png") and "/samples/" in k for k in artifact_keys), artifact_keys
    assert client.get_run(second.run_id).info.status == "FINISHED"
