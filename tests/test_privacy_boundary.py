"""The privacy boundary: sensitive shard sets are refused to every reader except the release."""
from __future__ import annotations

import json

import pytest

from privacy.boundary import check_readable, is_sensitive, mark_sensitive, read_manifest


def _shard_set(path, **extra):  # noqa: D103
    path.mkdir(parents=True)
    (path / "shard-000000.tar").write_bytes(b"")
    (path / "manifest.json").write_text(json.dumps({"num_samples": 1, **extra}))
    return path


def test_mark_and_refuse(tmp_path):
    d = _shard_set(tmp_path / "faces" / "train")
    public = _shard_set(tmp_path / "public" / "train")
    check_readable(d, job="train")  # not yet sensitive
    mark_sensitive(d)
    mark_sensitive(d)  # idempotent
    m = read_manifest(d)
    assert is_sensitive(m) and m["num_samples"] == 1
    for source in (d, str(d), d / "manifest.json", str(d / "shard-{000000..000000}.tar"), f"file://{d}",
                   tmp_path / "faces", m):  # the directory above a sensitive set is refused too
        with pytest.raises(PermissionError, match="sensitive shard set; only `flowrail privacy release` may read"):
            check_readable(source, job="train")
    check_readable(d, job="privacy release", allow_sensitive=True)
    check_readable(public, job="train")
    assert not is_sensitive(read_manifest(public))


def test_message_is_one_line_and_names_the_dir(tmp_path):
    d = _shard_set(tmp_path / "s")
    mark_sensitive(d)
    with pytest.raises(PermissionError) as err:
        check_readable(d, job="evaluate")
    assert "\n" not in str(err.value) and str(d) in str(err.value) and "evaluate" in str(err.value)


def test_mark_missing_dir_or_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard directory not found"):
        mark_sensitive(tmp_path / "nope")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        mark_sensitive(tmp_path / "bare")


def test_streaming_and_cli_refuse_a_marked_set(tmp_path, capsys):
    """The lead's streaming entry point refuses a marked set; `flowrail privacy mark` marks; errors exit 2."""
    from jobs.cli import main
    from pipeline.data.shards import write_shard_set
    from pipeline.data.streaming import describe
    import numpy as np

    d = tmp_path / "set"
    write_shard_set(d, ((f"k{i}", {"image.npy": np.zeros((8, 8, 1), np.uint8), "cls": 0}) for i in range(4)),
                    samples_per_shard=4, extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8],
                                                "num_classes": 1})
    describe(str(d), None, job="train")  # readable before marking
    assert main(["privacy", "mark", str(d)]) == 0
    with pytest.raises(PermissionError, match="sensitive shard set"):
        describe(str(d), None, job="train")
    assert main(["privacy", "mark", str(tmp_path / "missing")]) == 2
    assert "shard directory not found" in capsys.readouterr().err
    assert main(["privacy", "frobnicate"]) == 2


def test_the_fence_covers_every_directory_below_a_sensitive_set(tmp_path):
    """Walking up to the root: a set nested any depth inside a sensitive set (or a path not yet made there) is
    refused, however far below."""
    d = _shard_set(tmp_path / "faces")
    mark_sensitive(d)
    deep = _shard_set(tmp_path / "faces" / "a" / "b" / "c")
    for source in (deep, deep / "manifest.json", tmp_path / "faces" / "a" / "not-yet"):
        with pytest.raises(PermissionError, match=f"{d} is a sensitive shard set"):
            check_readable(source, job="train")


def test_a_manifest_may_only_name_shards_inside_its_directory(tmp_path):
    secret_set = _shard_set(tmp_path / "sensitive")
    mark_sensitive(secret_set)
    outside = _shard_set(tmp_path / "elsewhere")
    cases = {"../sensitive/shard-000000.tar": "outside its directory",
             str(outside / "shard-000000.tar"): "outside its directory",
             "../elsewhere/shard-000000.tar": "outside its directory"}
    for i, (name, msg) in enumerate(cases.items()):
        d = tmp_path / f"public{i}"
        _shard_set(d, shards=[{"name": name, "num_samples": 1}])
        with pytest.raises(PermissionError, match=msg) as err:
            check_readable(d, job="train")
        assert "\n" not in str(err.value)
    linked = _shard_set(tmp_path / "linked", shards=[{"name": "shard-000001.tar", "num_samples": 1}])
    (linked / "shard-000001.tar").symlink_to(secret_set / "shard-000000.tar")
    with pytest.raises(PermissionError, match="outside its directory"):
        check_readable(linked, job="train")
    fine = _shard_set(tmp_path / "fine", shards=[{"name": "shard-000000.tar", "num_samples": 1}])
    check_readable(fine, job="train")


def test_fenced_url_prefixes_are_refused(tmp_path, monkeypatch, capsys):
    from jobs.cli import main

    monkeypatch.setenv("FLOWRAIL_FENCE_REGISTRY", str(tmp_path / "fenced"))
    check_readable("s3://bucket/faces/train/shard-{000000..000009}.tar", job="train")  # not yet fenced
    assert main(["privacy", "mark", "s3://bucket/faces/"]) == 0
    assert main(["privacy", "mark", "s3://bucket/faces/"]) == 0  # idempotent
    assert (tmp_path / "fenced").read_text() == "s3://bucket/faces/\n"
    with pytest.raises(PermissionError, match="under the fenced prefix s3://bucket/faces/"):
        check_readable("s3://bucket/faces/train/shard-{000000..000009}.tar", job="train")
    check_readable("s3://bucket/public/train/shard-000000.tar", job="train")
