"""No reading path deserialises code from a shard, and a manifest cannot point outside its own set.

Each reading path (the training stream, the privacy stage's stream, ``flowrail encode``, ``flowrail flux_encode``,
plain ``iter_samples``) meets a shard set holding a ``.pkl`` member whose unpickling would create a marker file.
Ray's own opt-in to unpickling (``RAY_DATA_ALLOW_UNSAFE_DESERIALIZATION``-style variable) is switched on, so a path
that fell back to Ray's default decoder would run the payload: the marker must never appear and the member must be
refused in one line naming it.
"""
from __future__ import annotations

import builtins
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import iter_samples, read_manifest, shard_paths, write_shard_set
from pipeline.errors import DataError, first_line


class _Payload:
    """Unpickling this creates ``marker``: what a crafted shard member would do in a worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _hostile_set(root: Path, marker: Path, *, flowrail_format: bool) -> Path:
    """8x8 grey digits-like samples in 2 shards; the second shard's third sample carries ``evil.pkl``."""
    rng = np.random.default_rng(0)
    samples = [(f"s{i:03d}", {"image.npy": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "cls": i % 3})
               for i in range(24)]
    write_shard_set(root, iter(samples), samples_per_shard=12,
                    extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "dtype": "uint8",
                           "num_classes": 3})
    shard = root / "shard-000001.tar"
    members = []
    with tarfile.open(shard) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))  # type: ignore[union-attr]
    evil = pickle.dumps(_Payload(marker))
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            tar.addfile(m, io.BytesIO(data))
            if i == 5:  # after s014.cls: a member of sample s014
                info = tarfile.TarInfo("s014.evil.pkl")
                info.size = len(evil)
                tar.addfile(info, io.BytesIO(evil))
    manifest = json.loads((root / "manifest.json").read_text())
    if not flowrail_format:  # a set written by another tool: the generic read_webdataset stream reads it
        manifest.pop("format")
    manifest["shards"][1].pop("sha256")
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def allow_ray_unpickling(monkeypatch):
    """Switch on Ray's own opt-in to unpickling WebDataset members: only flowrail's decoder stands in the way."""
    from ray.data._internal.datasource import webdataset_datasource as wds

    monkeypatch.setenv(wds.ALLOW_UNSAFE_DESERIALIZATION_ENV_VAR, "1")


def _assert_refused(exc: BaseException, marker: Path) -> None:
    text = first_line(exc, None)  # what the CLI prints (Ray may append retry notes on further lines)
    assert "\n" not in text and "s014.evil.pkl" in text and "shard-000001.tar" in text, text
    assert not marker.exists(), "the pickle payload ran"


def test_payload_really_creates_the_marker(tmp_path):
    """The test's premise: unpickling the member does create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("flowrail_format", [True, False], ids=["tar_reader", "read_webdataset"])
def test_training_stream_refuses_pickle_member(ray_local, allow_ray_unpickling, tmp_path, flowrail_format):
    from pipeline.data.streaming import describe, epoch_dataset, name_bad_shard
    from pipeline.errors import user_error_in
    from pipeline.train.worker import _user_error

    marker = tmp_path / "pwned"
    root = _hostile_set(tmp_path / "set", marker, flowrail_format=flowrail_format)
    paths, info = describe(str(root), None)
    ds, files = epoch_dataset(paths, info, policy="skip", seed=0, epoch=0, rank=0, world=1)
    with pytest.raises(Exception) as caught:
        for _ in ds.iter_torch_batches(batch_size=4):
            pass
    found = _user_error(caught.value) or name_bad_shard(files, caught.value)  # what the worker raises
    _assert_refused(found, marker)
    assert "shard-000001.tar: member s014.evil.pkl" in str(user_error_in(caught.value)).splitlines()[0]


@pytest.mark.parametrize("flowrail_format", [True, False], ids=["tar_reader", "read_webdataset"])
def test_privacy_stream_refuses_pickle_member(ray_local, allow_ray_unpickling, tmp_path, flowrail_format):
    from pipeline.data.safe_decode import numpy_batches
    from pipeline.data.streaming import build_dataset

    marker = tmp_path / "pwned"
    root = _hostile_set(tmp_path / "set", marker, flowrail_format=flowrail_format)
    ds, _ = build_dataset(str(root), image_size=None, job="privacy train", shuffle_files=False)
    with pytest.raises(DataError) as caught:
        for _ in numpy_batches(ds):
            pass
    _assert_refused(caught.value, marker)


def test_iter_samples_refuses_pickle_member(tmp_path):
    marker = tmp_path / "pwned"
    root = _hostile_set(tmp_path / "set", marker, flowrail_format=True)
    with pytest.raises(DataError) as caught:
        list(iter_samples(root))
    _assert_refused(caught.value, marker)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_encode_cli_refuses_pickle_member(ray_local, allow_ray_unpickling, tiny_vae, tmp_path, capsys):
    from jobs.cli import main

    marker = tmp_path / "pwned"
    root = _hostile_set(tmp_path / "set", marker, flowrail_format=True)
    code = main(["encode", "--vae", str(tiny_vae), "--src", str(root), "--out", str(tmp_path / "out"),
                 "--batch-size", "8"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("flowrail encode:")]
    assert code == 2 and len(err) == 1, err
    _assert_refused(DataError(err[0]), marker)


def test_flux_encode_refuses_pickle_member(ray_local, allow_ray_unpickling, tmp_path):
    from pipeline.flux.encode import EncoderPaths, encode_shards
    from pipeline.flux.tiny import write_tiny_flux_pipeline

    marker = tmp_path / "pwned"
    root = _hostile_set(tmp_path / "set", marker, flowrail_format=False)
    paths = EncoderPaths.from_pipeline(write_tiny_flux_pipeline(tmp_path / "pipe", ["a", "b"]))
    with pytest.raises(DataError) as caught:
        encode_shards(root, tmp_path / "enc", paths, size=16, t5_max_length=8, batch_size=4, concurrency=1,
                      num_cpus=0.5)
    _assert_refused(caught.value, marker)


@pytest.mark.parametrize("name", ["../other/shard-000000.tar", "/etc/hostname", "a/../../x.tar",
                                  "s3://elsewhere/x.tar", "..\\x.tar", ""])
def test_manifest_names_are_confined_to_the_set(tmp_path, name):
    root = tmp_path / "sets" / "mine"
    write_shard_set(root, ((f"k{i}", {"image.npy": np.zeros((8, 8, 1), np.uint8), "cls": 0}) for i in range(4)),
                    samples_per_shard=4, extra={"kind": "pixels", "shape": [1, 8, 8], "num_classes": 1})
    other = tmp_path / "sets" / "other"
    other.mkdir()
    (other / "shard-000000.tar").write_bytes((root / "shard-000000.tar").read_bytes())  # exists: only the rule refuses
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as caught:
        shard_paths(root, read_manifest(root))
    assert "outside its own directory" in str(caught.value) and repr(name) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_confined_names_allow_subfolders(tmp_path):
    from pipeline.data.shards import confined_name

    assert confined_name("part-1/shard-000000.tar", tmp_path) == "part-1/shard-000000.tar"
