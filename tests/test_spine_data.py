"""Shards (digits and image folders) and Ray Data streaming of them."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import iter_samples, read_manifest, sha256_file, verify_shards
from pipeline.data.sources import digits_split, write_image_folder
from pipeline.data.streaming import build_dataset
from pipeline.errors import DataError


def test_digits_manifest(digits_shards):
    train, val = read_manifest(digits_shards / "train"), read_manifest(digits_shards / "val")
    assert train["num_samples"] + val["num_samples"] == 1797
    assert train["shape"] == [1, 8, 8] and train["num_classes"] == 10
    assert sum(s["num_samples"] for s in train["shards"]) == train["num_samples"]
    for entry in train["shards"]:
        assert sha256_file(digits_shards / "train" / entry["name"]) == entry["sha256"]
    verify_shards(digits_shards / "train")


def test_digits_split_is_deterministic_and_disjoint(digits_shards):
    a, b = digits_split(), digits_split()
    assert np.array_equal(a["train"][1], b["train"][1])
    keys = {k for k, _ in iter_samples(digits_shards / "val")}
    assert len(keys) == 359
    images = np.stack([s["image.npy"] for _, s in iter_samples(digits_shards / "val")])
    assert np.array_equal(images, a["val"][0])


def test_image_folder_shards(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(src / cls / f"{i}.png")
    manifests = write_image_folder(src, tmp_path / "out", size=16, samples_per_shard=4)
    m = manifests["train"]
    assert m["num_samples"] == 10 and len(m["shards"]) == 3 and m["shape"] == [3, 16, 16]
    assert m["classes"] == ["cat", "dog"]
    labels = sorted(s["cls"] for _, s in iter_samples(tmp_path / "out"))
    assert labels == [0] * 5 + [1] * 5


def test_image_folder_without_classes_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        write_image_folder(tmp_path / "empty", tmp_path / "out", size=8)


def test_ray_data_stream_normalises_and_resizes(ray_local, digits_shards):
    ds, info = build_dataset(str(digits_shards / "val"), image_size=16)
    assert (info.channels, info.size, info.num_classes) == (1, 16, 10)
    batches = list(ds.iter_torch_batches(batch_size=100))
    images = np.concatenate([b["image"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert images.shape == (359, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.99 and images.max() > 0.9
    assert sorted(np.bincount(labels, minlength=10)) == sorted(np.bincount(digits_split()["val"][1], minlength=10))


def test_manifest_missing_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no shard set at"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [], "num_samples": 0}))
    with pytest.raises(DataError, match="is empty"):
        read_manifest(tmp_path)
