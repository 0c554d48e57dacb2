"""The flowrail-format shard reader gives the same batches as read_webdataset + Decode, with the same bad-sample
policy, and names corrupt shards."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import iter_samples, write_shard_set
from pipeline.data.streaming import Decode, describe
from pipeline.data.tar_reader import (
    ParseShards,
    is_flowrail_format,
    is_flowrail_shards,
    read_shards,
    tar_members,
)
from pipeline.errors import DataError


def _parse_dir(shard_dir: Path, image_size: int | None, policy: str = "skip") -> dict[str, np.ndarray]:
    paths, info = describe(str(shard_dir), image_size)
    parser = ParseShards(info, policy)
    batch = {"bytes": np.array([Path(p).read_bytes() for p in paths], dtype=object), "path": np.array(paths)}
    return parser(batch)


def _decode_reference(shard_dir: Path, image_size: int | None) -> dict[str, np.ndarray]:
    _, info = describe(str(shard_dir), image_size)
    samples = list(iter_samples(shard_dir))
    arrays = [s[info.field] for _, s in samples]
    return Decode(info)({info.field: arrays, "cls": np.array([s.get("cls", -1) for _, s in samples]),
                         "__key__": np.array([k for k, _ in samples])})


def test_same_batch_as_decode_pixels_resized(digits_shards: Path) -> None:
    ours = _parse_dir(digits_shards / "train", 16)
    ref = _decode_reference(digits_shards / "train", 16)
    assert ours["image"].shape == ref["image"].shape == (1438, 1, 16, 16)
    assert ours["image"].dtype == np.float32
    np.testing.assert_array_equal(ours["image"], ref["image"])
    np.testing.assert_array_equal(ours["label"], ref["label"])
    assert ours["skipped"].sum() == 0


def _latent_set(tmp_path: Path, bad: bool) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    good = {f"k{i:03d}": rng.standard_normal((4, 4, 4)).astype(np.float32) for i in range(12)}
    samples: list[tuple[str, dict]] = [(k, {"latent.npy": v, "cls": i % 3}) for i, (k, v) in enumerate(good.items())]
    if bad:
        nan = np.ones((4, 4, 4), np.float32)
        nan[1, 2, 3] = np.nan
        samples.insert(2, ("bnan", {"latent.npy": nan, "cls": 1}))
        samples.insert(5, ("bshape", {"latent.npy": np.ones((4, 4, 5), np.float32), "cls": 1}))
        samples.insert(7, ("bmissing", {"cls": 1}))
        samples.insert(9, ("bgarbage", {"latent.npy": b"\x93NUMPY not really", "cls": 1}))
        samples.insert(10, ("nolabel", {"latent.npy": good["k000"]}))
    write_shard_set(tmp_path / "lat", samples, samples_per_shard=7,
                    extra={"kind": "latents", "field": "latent.npy", "shape": [4, 4, 4], "num_classes": 3})
    return tmp_path / "lat", good


def test_latents_pass_through_and_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    shard_dir, good = _latent_set(tmp_path, bad=True)
    out = _parse_dir(shard_dir, 16)  # image_size is ignored for latents
    keys = list(good)
    expected = np.stack([good[k] for k in keys[:6]] + [good["k000"]] + [good[k] for k in keys[6:]])
    np.testing.assert_array_equal(out["image"], expected)
    assert out["label"].tolist() == [i % 3 for i in range(6)] + [-1] + [i % 3 for i in range(6, 12)]
    assert out["skipped"].sum() == 4


@pytest.mark.parametrize("key", ["bnan", "bshape", "bmissing", "bgarbage", "blabel"])
def test_fail_policy_names_the_bad_sample(tmp_path: Path, key: str) -> None:
    rng = np.random.default_rng(1)
    samples = [(f"k{i}", {"latent.npy": rng.standard_normal((4, 4, 4)).astype(np.float32), "cls": 0})
               for i in range(3)]
    bad = {"bnan": {"latent.npy": np.full((4, 4, 4), np.inf, np.float32)},
           "bshape": {"latent.npy": np.ones((3, 4, 4), np.float32)},
           "bmissing": {"cls": 1}, "bgarbage": {"latent.npy": b"garbage"},
           "blabel": {"latent.npy": np.ones((4, 4, 4), np.float32), "cls": "seven"}}[key]
    write_shard_set(tmp_path / "lat", samples + [(key, bad)], samples_per_shard=10,
                    extra={"kind": "latents", "field": "latent.npy", "shape": [4, 4, 4], "num_classes": 3})
    with pytest.raises(DataError, match=f"sample {key} in .*shard-000000.tar"):
        _parse_dir(tmp_path / "lat", None, policy="fail")
    assert _parse_dir(tmp_path / "lat", None, policy="skip")["skipped"].sum() == 1


def test_truncated_and_corrupt_shards_are_named(tmp_path: Path) -> None:
    shard_dir, _ = _latent_set(tmp_path, bad=False)
    data = (shard_dir / "shard-000000.tar").read_bytes()
    with pytest.raises(DataError, match="shard cut.tar is corrupt or truncated"):
        tar_members(data[:len(data) // 2 + 100], "cut.tar")
    flipped = bytearray(data)
    flipped[1024 + 130] ^= 0x01  # a size digit in the second member's header
    with pytest.raises(DataError, match="shard flip.tar is corrupt"):
        tar_members(bytes(flipped), "flip.tar")
    assert len(tar_members(data, "ok.tar")) == 14  # 7 samples x (latent.npy, cls)


def test_pax_long_names_fall_back_to_tarfile(tmp_path: Path) -> None:
    key = "d" * 120 + "/sample"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in ((f"{key}.latent.npy", np.arange(64, dtype=np.float32).reshape(4, 4, 4)),
                              (f"{key}.cls", b"2")):
            if isinstance(payload, np.ndarray):
                b = io.BytesIO()
                np.save(b, payload)
                payload = b.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    members = tar_members(buf.getvalue(), "pax.tar")
    assert [m.name for m in members] == [f"{key}.latent.npy", f"{key}.cls"]
    from pipeline.data.streaming import DataInfo

    info = DataInfo(kind="latents", field="latent.npy", channels=4, size=4, num_classes=3, num_samples=1)
    out = ParseShards(info)({"bytes": np.array([buf.getvalue()], dtype=object), "path": np.array(["pax.tar"])})
    np.testing.assert_array_equal(out["image"][0], np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    assert out["label"].tolist() == [2]


def test_ray_stream_matches_read_webdataset_in_order(ray_local, digits_shards: Path) -> None:
    import ray.data

    from pipeline.data.shards import read_manifest
    from pipeline.data.streaming import build_dataset

    assert is_flowrail_format(read_manifest(digits_shards / "val"))
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        paths, info = describe(str(digits_shards / "val"), 16)
        ours = list(read_shards(paths, info).iter_torch_batches(batch_size=100))
        ref = list(build_dataset(str(digits_shards / "val"), image_size=16, shuffle_files=False)[0]
                   .iter_torch_batches(batch_size=100))
    finally:
        ctx.execution_options.preserve_order = before
    cat = {k: np.concatenate([b[k].numpy() for b in ours]) for k in ("image", "label", "skipped")}
    cat_ref = {k: np.concatenate([b[k].numpy() for b in ref]) for k in ("image", "label", "skipped")}
    assert cat["image"].shape == (359, 1, 16, 16)
    for k, value in cat.items():
        np.testing.assert_array_equal(value, cat_ref[k])


def test_fail_policy_reports_the_first_bad_sample_in_shard_order(tmp_path: Path) -> None:
    ok = np.zeros((4, 4, 4), np.float32)
    samples = [("a", {"latent.npy": ok, "cls": 0}), ("b", {"latent.npy": np.zeros((2, 4, 4), np.float32)}),
               ("c", {"cls": 1}), ("d", {"latent.npy": ok, "cls": 2})]
    write_shard_set(tmp_path / "lat", samples, samples_per_shard=10,
                    extra={"kind": "latents", "field": "latent.npy", "shape": [4, 4, 4], "num_classes": 3})
    with pytest.raises(DataError, match="sample b in .*does not match the manifest"):
        _parse_dir(tmp_path / "lat", None, policy="fail")


def test_only_flowrail_manifests_select_the_fast_reader(digits_shards: Path, tmp_path: Path) -> None:
    tars = sorted(str(p) for p in (digits_shards / "val").glob("*.tar"))
    assert is_flowrail_shards(tars)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.tar").write_bytes(Path(tars[0]).read_bytes())
    assert not is_flowrail_shards([str(other / "a.tar")])  # no manifest: generic WebDataset tars
    (other / "manifest.json").write_text('{"format": "something-else", "shards": [{"name": "a.tar"}]}')
    assert not is_flowrail_shards([str(other / "a.tar")])
    assert not is_flowrail_shards(["s3://bucket/shard-000000.tar"])
