"""The noisy release: never writes a clean sensitive sample, one fixed noise draw, no secret downstream."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.data.shards import iter_samples, write_shard_set
from privacy.boundary import mark_sensitive
from privacy.release import read_release, release, sample_noise, to_signed_chw

SECRET = b"correct horse battery staple"


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, size=n)


def _shard_set(path, n, seed, sensitive):
    images, labels = _images(n, seed)
    write_shard_set(path, ((f"s{i:04d}", {"image.npy": im, "cls": int(lb)}) for i, (im, lb) in enumerate(zip(images, labels))),
                    samples_per_shard=64, extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8],
                                                 "dtype": "uint8", "num_classes": 10})
    if sensitive:
        mark_sensitive(path)
    return images


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _canonical(a: np.ndarray) -> str:
    """Hash of an array brought back to the sensitive set's uint8 HWC form (undoing scale and layout)."""
    if a.dtype != np.uint8:
        a = np.clip(np.round((np.transpose(a.astype(np.float64), (1, 2, 0)) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return _sha(a)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    sensitive = _shard_set(root / "sensitive", 300, 0, True)
    _shard_set(root / "public", 20, 1, False)
    return root, sensitive


def test_release_never_writes_a_clean_sensitive_sample(sets):
    root, sensitive = sets
    out = release(root / "sensitive", root / "out", 0.59, SECRET, clean_fraction=0.04, dtype="float16",
                  samples_per_shard=64)
    m = out.manifest
    assert m["counts"] == {"sensitive": 300, "noisy": 288, "clean": 12, "clean_from_sensitive": 12}
    sensitive_hashes = {_sha(im) for im in sensitive}
    noisy = list(iter_samples(out.noisy_dir))
    clean = list(iter_samples(out.clean_dir))
    assert len(noisy) == 288 and len(clean) == 12
    for key, sample in noisy:
        y = sample["image.npy"]
        assert y.dtype == np.float16 and y.shape == (1, 8, 8)
        assert _sha(y) not in sensitive_hashes and _canonical(y) not in sensitive_hashes, key
    clean_keys = {k for k, _ in clean}
    assert clean_keys.isdisjoint(k for k, _ in noisy)  # consented samples are not also released noisy
    assert {_canonical(s["image.npy"]) for _, s in clean} <= sensitive_hashes  # declared consented, copied as is

    # y = x + s eps with the one fixed draw for that key; the noise is standard normal overall
    by_key = {f"s{i:04d}": im for i, im in enumerate(sensitive)}
    eps = np.stack([(s["image.npy"].astype(np.float64) - to_signed_chw(by_key[k])) / 0.59 for k, s in noisy])
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02
    k0, s0 = noisy[0]
    np.testing.assert_allclose(s0["image.npy"], to_signed_chw(by_key[k0]) + 0.59 * sample_noise(SECRET, k0, (1, 8, 8)),
                               atol=4e-3)

    # the secret is nowhere in what the release writes
    for path in (root / "out").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes(), path
    rec = read_release(root / "out")
    assert rec["noise_std"] == 0.59 and len(rec["noisy"]["shards"]) == 5 and all(s["sha256"] for s in rec["noisy"]["shards"])
    assert json.loads((out.noisy_dir / "manifest.json").read_text())["sensitive"] is False


def test_release_is_deterministic_per_key_and_secret(sets, tmp_path):
    root, _ = sets
    a = release(root / "sensitive", tmp_path / "a", 0.59, SECRET, clean_from=root / "public")
    b = release(root / "sensitive", tmp_path / "b", 0.59, SECRET, clean_from=root / "public")
    c = release(root / "sensitive", tmp_path / "c", 0.59, b"another secret")
    assert a.manifest["noisy"]["shards"] == b.manifest["noisy"]["shards"]  # same bytes: noise never redrawn
    assert a.manifest["noisy"]["shards"] != c.manifest["noisy"]["shards"]
    assert a.manifest["counts"] == {"sensitive": 300, "noisy": 300, "clean": 20, "clean_from_sensitive": 0}
    assert c.manifest["counts"]["clean"] == 0 and c.clean_dir is None


def test_release_input_errors(sets, tmp_path):
    root, _ = sets
    with pytest.raises(ValueError, match="not marked sensitive"):
        release(root / "public", tmp_path / "x", 0.59, SECRET)
    with pytest.raises(ValueError, match="either --clean-from"):
        release(root / "sensitive", tmp_path / "x", 0.59, SECRET, clean_from=root / "public", clean_fraction=0.1)
    with pytest.raises(ValueError, match="noise-std"):
        release(root / "sensitive", tmp_path / "x", 0.0, SECRET)
    with pytest.raises(PermissionError, match="sensitive shard set"):  # a sensitive set is no public clean source
        release(root / "sensitive", tmp_path / "y", 0.59, SECRET, clean_from=root / "sensitive")


def test_release_cli_reads_the_secret_from_a_file_or_env(sets, tmp_path, monkeypatch, capsys):
    from jobs.cli import main

    root, _ = sets
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    args = ["privacy", "release", "--sensitive", str(root / "sensitive"), "--noise-std", "0.59", "--clean-fraction",
            "0.1"]
    assert main(args + ["--out", str(tmp_path / "a"), "--secret-seed-file", str(secret_file)]) == 0
    monkeypatch.setenv("FLOWRAIL_PRIVACY_SECRET", SECRET.decode())
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert read_release(tmp_path / "a")["noisy"]["shards"] == read_release(tmp_path / "b")["noisy"]["shards"]
    monkeypatch.delenv("FLOWRAIL_PRIVACY_SECRET")
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "c")]) == 2
    assert "no secret noise seed" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "a"), "--secret-seed-file", str(secret_file)]) == 2  # no overwrite
