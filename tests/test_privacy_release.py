"""The noisy release: keyed-PRF noise, derived re-releases only, a fence that keeps keys/secret/paths in, consent."""
from __future__ import annotations

import hashlib
import json
import stat

import numpy as np
import pytest

from pipeline.data.shards import iter_samples, write_shard_set
from privacy import ledger
from privacy.boundary import mark_sensitive
from privacy.noise import sample_noise
from privacy.release import read_release, release, to_signed_chw

SECRET = hashlib.sha256(b"flowrail release tests").digest()  # 256 bits (tests only: a fixed secret)


def _shard_set(path, n, seed, sensitive):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    write_shard_set(path, ((f"s{i:04d}", {"image.npy": im, "cls": int(lb)}) for i, (im, lb) in enumerate(zip(images, labels))),
                    samples_per_shard=64, extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8],
                                                 "dtype": "uint8", "num_classes": 10})
    if sensitive:
        mark_sensitive(path)
    return {f"s{i:04d}": (im, int(lb)) for i, (im, lb) in enumerate(zip(images, labels))}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _canonical(a: np.ndarray) -> str:
    """Hash of an array brought back to the sensitive set's uint8 HWC form (undoing scale and layout)."""
    if a.dtype != np.uint8:
        a = np.clip(np.round((np.transpose(a.astype(np.float64), (1, 2, 0)) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return _sha(a)


@pytest.fixture(autouse=True)
def own_ledger(tmp_path, monkeypatch):
    """Each test its own content-keyed ledger (the tests release the same seeded images)."""
    monkeypatch.setenv("FLOWRAIL_PRIVACY_LEDGER", str(tmp_path / "ledger"))


@pytest.fixture
def sensitive(tmp_path):
    data = _shard_set(tmp_path / "sensitive", 300, 0, True)
    _shard_set(tmp_path / "public", 20, 1, False)
    return tmp_path, data


def _consent(path, keys):
    path.write_text("\n".join(keys) + "\n")
    return path


def _text_of_tree(root) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_release_keeps_originals_keys_and_secret_inside_the_fence(sensitive):
    root, data = sensitive
    consent = _consent(root / "sensitive" / "consent.txt", ["s0003", "s0100", "s0200"])
    out = release(root / "sensitive", root / "out", 0.59, consent_list=consent, samples_per_shard=64)
    m = out.manifest
    assert m["counts"] == {"noisy": 297, "clean": 3, "consented": 3, "public_clean": 0}
    assert m["labels"] == "withheld" and m["consent"]["fraction"] == 0.01

    # a generated 256-bit secret, 0600, inside the fence; never in the release
    assert out.secret_created and out.secret_path.parent.parent == root / "sensitive"
    assert stat.S_IMODE(out.secret_path.stat().st_mode) == 0o600
    secret = bytes.fromhex(out.secret_path.read_text())
    assert len(secret) == 32
    written = _text_of_tree(root / "out")
    assert secret not in written and secret.hex().encode() not in written

    # noisy copies: random keys in random order, labels withheld, y = x + s eps(secret, release id, sensitive key)
    noisy = list(iter_samples(out.noisy_dir))
    assert not {k for k, _ in noisy} & set(data)
    assert [k for k, _ in noisy] != sorted(k for k, _ in noisy)
    record = ledger.read_record(root / "sensitive", m["release_id"])
    assert set(record["keys"]) == {k for k, _ in noisy} and set(record["consented"].values()) == {"s0003", "s0100", "s0200"}
    originals = [record["keys"][k] for k, _ in noisy]
    assert [originals.index(k) for k in sorted(originals)] != list(range(len(originals)))  # order shuffled
    hashes = {_sha(im) for im, _ in data.values()}
    eps = []
    for key, sample in noisy:
        y = sample["image.npy"]
        assert y.dtype == np.float16 and sample["cls"] == -1
        assert _sha(y) not in hashes and _canonical(y) not in hashes
        x = to_signed_chw(data[record["keys"][key]][0])
        expected = x + 0.59 * sample_noise(secret, m["release_id"], record["keys"][key], x.shape)
        np.testing.assert_allclose(y, expected, atol=4e-3)
        eps.append((y - x) / 0.59)
    eps = np.stack(eps)
    n = eps.size  # standard normal draws: 5 standard errors of the mean (1/sqrt(n)) and of the std (1/sqrt(2n))
    assert abs(eps.mean()) < 5 / np.sqrt(n) and abs(eps.std() - 1) < 5 / np.sqrt(2 * n), (eps.mean(), eps.std(), n)
    clean = list(iter_samples(out.clean_dir))
    assert {_canonical(s["image.npy"]) for _, s in clean} == {_sha(data[k][0]) for k in ("s0003", "s0100", "s0200")}
    assert not {k for k, _ in clean} & set(data)

    # release.json: counts and levels; no sensitive path, key or shard hash
    text = (root / "out" / "release.json").read_text()
    sens_manifest = json.loads((root / "sensitive" / "manifest.json").read_text())
    assert str(root / "sensitive") not in text and "s0003" not in text
    assert not any(s["sha256"] in written.decode("latin-1") for s in sens_manifest["shards"])


def test_noise_is_a_keyed_prf_of_secret_release_and_key():
    a = sample_noise(SECRET, "r1", "k", (4096,))
    np.testing.assert_array_equal(a, sample_noise(SECRET, "r1", "k", (4096,)))
    for other in (sample_noise(SECRET, "r2", "k", (4096,)), sample_noise(SECRET, "r1", "k2", (4096,)),
                  sample_noise(SECRET[::-1], "r1", "k", (4096,))):
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.06
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05


def _by_original(release_dir, sensitive_dir):
    rec = ledger.read_record(sensitive_dir, read_release(release_dir)["release_id"])
    return {rec["keys"][k]: s["image.npy"].astype(np.float64) for k, s in iter_samples(release_dir / "noisy")}


def test_two_releases_recover_x_no_better_than_the_less_noisy_one(sensitive):
    """With two published levels of one set, no estimator ``y1 + c (y2 - y1)`` (c in [-3, 3]: it holds the difference
    attack that undoes a shared eps, and every mix of the two) beats y1 alone. Reusing one eps across the levels (or
    two independent releases, which average down) makes this fail."""
    root, data = sensitive
    r1 = release(root / "sensitive", root / "r1", 0.3, secret=SECRET, dtype="float32")
    r2 = release(root / "sensitive", root / "r2", 0.6, secret=SECRET, dtype="float32", derive_from=r1.out_dir)
    assert r2.manifest["derived_from"]["noise_std"] == 0.3
    y1, y2 = _by_original(r1.out_dir, root / "sensitive"), _by_original(r2.out_dir, root / "sensitive")
    keys = sorted(data)
    x = np.stack([to_signed_chw(data[k][0]) for k in keys])
    a, b = np.stack([y1[k] for k in keys]), np.stack([y2[k] for k in keys])

    def rmse(est):
        return float(np.sqrt(((est - x) ** 2).mean()))

    alone = rmse(a)
    assert abs(alone - 0.3) < 0.01 and abs(rmse(b) - 0.6) < 0.02
    best = min(rmse(a + c * (b - a)) for c in np.linspace(-3, 3, 601))
    assert best > 0.98 * alone


def _assert_nothing_written(root, before):
    after = sorted(str(p) for p in root.rglob("*"))
    assert after == before


@pytest.mark.parametrize("case", ["lower", "equal", "independent", "unknown_consent", "over_cap", "weak_secret",
                                  "secret_beside", "missing_secret", "out_in_fence"])
def test_bad_release_input_is_refused_and_writes_nothing(sensitive, case):
    root, _ = sensitive
    first = release(root / "sensitive", root / "r1", 0.59, secret=SECRET,
                    consent_list=_consent(root / "sensitive" / "c1", ["s0001"]))
    (root / "keys").mkdir()
    (root / "keys" / "weak").write_text("00112233445566778899aabbccddee")  # 120 bits
    (root / "beside").mkdir()
    (root / "beside" / "secret").write_text(SECRET.hex())
    before = sorted(str(p) for p in root.rglob("*"))
    out = root / "new"
    calls = {
        "lower": (dict(derive_from=first.out_dir), 0.3, "not above the earlier release level"),
        "equal": (dict(derive_from=first.out_dir), 0.59, "not above the earlier release level"),
        "independent": ({}, 1.0, "second independent release"),
    }
    if case in calls:
        kw, s, msg = calls[case]
        kw = {**kw, "secret": SECRET}
    else:
        fresh = root / "other"
        _shard_set(fresh, 300, 3, True)
        _consent(fresh / "unknown.txt", ["s0001", "nobody"])
        _consent(fresh / "big.txt", [f"s{i:04d}" for i in range(31)])  # 10.3%
        before = sorted(str(p) for p in root.rglob("*"))
        s = 0.59
        kw, msg = {
            "unknown_consent": (dict(consent_list=fresh / "unknown.txt"), r"1 key\(s\) not in the sensitive set"),
            "over_cap": (dict(consent_list=fresh / "big.txt"), "above the 10% cap"),
            "weak_secret": (dict(secret_file=root / "keys" / "weak"), "holds 120 bits"),
            "secret_beside": (dict(secret_file=root / "beside" / "secret"), "in or beside the release"),
            "missing_secret": (dict(secret_file=root / "keys" / "nope"), "secret file not found"),
            "out_in_fence": ({}, "inside the sensitive set"),
        }[case]
        if case == "secret_beside":
            out = root / "beside" / "release"
        if case == "out_in_fence":
            out = fresh / "release"
        with pytest.raises((ValueError, FileNotFoundError), match=msg) as err:
            release(fresh, out, s, **kw)
        assert "\n" not in str(err.value)
        _assert_nothing_written(root, before)
        return
    with pytest.raises(ValueError, match=msg) as err:
        release(root / "sensitive", out, s, **kw)
    assert "\n" not in str(err.value)
    _assert_nothing_written(root, before)


def test_large_clean_fraction_needs_the_flag_and_is_recorded(sensitive):
    root, _ = sensitive
    big = _consent(root / "sensitive" / "big.txt", [f"s{i:04d}" for i in range(60)])
    out = release(root / "sensitive", root / "r", 0.59, secret=SECRET, consent_list=big, allow_large_clean_fraction=True,
                  release_labels=True)
    assert out.manifest["consent"] == {"fraction": 0.2, "cap": 0.1, "allow_large_clean_fraction": True,
                                       "list_sha256": hashlib.sha256(big.read_bytes()).hexdigest()}
    assert out.manifest["labels"] == "released"
    assert {s["cls"] for _, s in iter_samples(out.noisy_dir)} - {-1} and \
        json.loads((out.noisy_dir / "manifest.json").read_text())["num_classes"] == 10


def test_release_cli_exits_2_on_bad_input_and_never_prints_the_secret(sensitive, capsys):
    from jobs.cli import main

    root, _ = sensitive
    base = ["privacy", "release", "--sensitive", str(root / "sensitive"), "--noise-std", "0.59"]
    (root / "keys").mkdir()
    (root / "keys" / "weak").write_text("short")
    assert main(base + ["--out", str(root / "a"), "--secret-file", str(root / "keys" / "weak")]) == 2
    err = capsys.readouterr().err
    assert "holds 40 bits" in err and err.count("\n") == 1 and not (root / "a").exists()
    assert main(base + ["--out", str(root / "a"), "--consent-list", str(_consent(root / "sensitive" / "c", ["zz"]))]) == 2
    assert "not in the sensitive set" in capsys.readouterr().err and not (root / "a").exists()
    assert main(base + ["--out", str(root / "a")]) == 0
    printed = capsys.readouterr()
    secret = (root / "sensitive" / ".flowrail-privacy" / "secret").read_text()
    assert "generated a new 256-bit secret" in printed.out and secret not in printed.out + printed.err
    assert main(base[:-1] + ["0.3", "--out", str(root / "b"), "--derive-from", str(root / "a")]) == 2
    assert "not above the earlier release level" in capsys.readouterr().err and not (root / "b").exists()
    assert main(base[:-1] + ["0.9", "--out", str(root / "b"), "--derive-from", str(root / "a")]) == 0
    assert read_release(root / "b")["derived_from"]["noise_std"] == 0.59
