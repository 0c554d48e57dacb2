"""The privacy stage tried as an attacker would (docs/PRIVACY.md, threat model): anyone who can run flowrail commands
and read and plant files and links outside the fence. One test per attack; each fails when its defence is removed.

No Ray, no training: the attacks use the public CLI and library entry points on small real shard sets."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_output import flowrail_lines
from pipeline.data.shards import iter_samples, write_shard_set
from privacy import ledger
from privacy.boundary import mark_sensitive
from privacy.release import read_release, release

SECRET = hashlib.sha256(b"flowrail attack tests").digest()
N = 120


@pytest.fixture(autouse=True)
def own_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWRAIL_PRIVACY_LEDGER", str(tmp_path / "fence-home" / "ledger"))
    monkeypatch.setenv("FLOWRAIL_FENCE_REGISTRY", str(tmp_path / "fence-home" / "fenced_prefixes"))


def _images(n: int = N, seed: int = 0) -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(f"s{i:04d}", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), int(rng.integers(10))) for i in range(n)]


def _write(path: Path, items, per_shard: int = 32, sensitive: bool = False) -> Path:
    write_shard_set(path, ((k, {"image.npy": im, "cls": c}) for k, im, c in items), samples_per_shard=per_shard,
                    extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "dtype": "uint8",
                           "num_classes": 10})
    if sensitive:
        mark_sensitive(path)
    return path


@pytest.fixture
def world(tmp_path):
    """``tmp_path/sensitive`` (marked, with a consent list inside its fence) and ``tmp_path/public``."""
    items = _images()
    sens = _write(tmp_path / "sensitive", items, sensitive=True)
    (sens / "consent.txt").write_text("s0001\ns0002\n")
    _write(tmp_path / "public", _images(40, seed=9))
    return tmp_path, sens, items


def _outside_files(root: Path, fences: list[Path]) -> list[Path]:
    """Every file under ``root`` outside the given fences (and outside the ledger's home)."""
    skip = [str(f.resolve()) for f in fences] + [str((root / "fence-home").resolve())]
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and not any(str(p.resolve()).startswith(s + os.sep) or str(p.resolve()) == s for s in skip)]


def _leaks(root: Path, sens: Path, items, skip: Path) -> int:
    """How many files outside the fence (and outside ``skip``, the attacker's own planted files) hold a
    non-consented original's bytes or the secret."""
    patterns = [im.tobytes() for k, im, _c in items if k not in ("s0001", "s0002")]
    secret_file = sens / ".flowrail-privacy" / "secret"
    if secret_file.is_file():
        patterns.append(secret_file.read_bytes())
    hits = 0
    for p in _outside_files(root, [sens, skip]):
        data = p.read_bytes()
        hits += any(pat in data for pat in patterns)
    return hits


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from jobs.cli import main

    capsys.readouterr()
    rc = main(args)
    return rc, flowrail_lines(capsys.readouterr().err)


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if "fence-home" not in p.parts)


def _refused(args, capsys, root: Path, match: str) -> None:
    """The CLI refuses in one line naming the thing, exit 2, and writes nothing outside the fence."""
    before = _snapshot(root)
    rc, lines = _cli(args, capsys)
    assert rc == 2 and len(lines) == 1 and match in lines[0], (rc, lines)
    assert _snapshot(root) == before


# ---- derive from a forged earlier release -------------------------------------------------------------------------

@pytest.mark.parametrize("forgery", ["linked_clean_and_noisy", "linked_clean", "edited_noisy_shard", "unknown_id"])
def test_derive_from_a_forged_earlier_release_is_refused(world, capsys, forgery):
    """A public release whose ``noisy/`` or ``clean/`` was replaced by a link to the sensitive set, whose shard was
    edited, or whose id the ledger does not know: ``--derive-from`` refuses it, reads nothing from it, and nothing of
    the sensitive set (originals, secret, ledger) appears outside the fence. Without the hash verification and the
    no-links rule, the old derive copied ``clean/`` through the link."""
    root, sens, items = world
    first = release(sens, root / "r1", 0.3, consent_list=sens / "consent.txt", dtype="float32")
    forged = root / "forged"
    shutil.copytree(first.out_dir, forged)
    if forgery == "linked_clean_and_noisy":
        shutil.rmtree(forged / "clean"), shutil.rmtree(forged / "noisy")
        (forged / "clean").symlink_to(sens)
        (forged / "noisy").symlink_to(sens)
        match = "symbolic link"
    elif forgery == "linked_clean":
        shutil.rmtree(forged / "clean")
        (forged / "clean").symlink_to(sens)
        match = "symbolic link"
    elif forgery == "edited_noisy_shard":
        shard = sorted((forged / "noisy").glob("*.tar"))[0]
        data = bytearray(shard.read_bytes())
        data[1000] ^= 1
        shard.write_bytes(bytes(data))
        match = "differs from what the ledger recorded"
    else:
        rec = json.loads((forged / "release.json").read_text())
        (forged / "release.json").write_text(json.dumps({**rec, "release_id": "0" * 32}))
        match = "not a release the ledger knows"
    _refused(["privacy", "release", "--sensitive", str(sens), "--out", str(root / "r2"), "--noise-std", "0.6",
              "--derive-from", str(forged)], capsys, root, match)
    assert not (root / "r2").exists()
    assert _leaks(root, sens, items, skip=root / "forged") == 0


def test_a_derived_release_recopies_clean_from_the_originals_inside_the_fence(world):
    """The honest path: clean/ of a derived release is the consented originals again (not the earlier directory)."""
    root, sens, items = world
    first = release(sens, root / "r1", 0.3, consent_list=sens / "consent.txt", dtype="float32")
    shutil.rmtree(first.out_dir / "clean")  # the earlier clean/ is not needed: it is re-read from the fence
    second = release(sens, root / "r2", 0.6, derive_from=first.out_dir)
    by_key = {k: im for k, im, _ in items}
    got = sorted(s["image.npy"].tobytes() for _, s in iter_samples(second.out_dir / "clean"))
    assert got == sorted(by_key[k].tobytes() for k in ("s0001", "s0002"))
    assert second.manifest["consent"]["list_sha256"] == hashlib.sha256((sens / "consent.txt").read_bytes()).hexdigest()


# ---- readers that walk around the fence ---------------------------------------------------------------------------

def _linked_set(root: Path, sens: Path) -> Path:
    """A harmless public manifest whose tars are links into the sensitive set."""
    fake = root / "harmless"
    shutil.copytree(root / "public", fake)
    for tar in fake.glob("*.tar"):
        tar.unlink()
    manifest = json.loads((fake / "manifest.json").read_text())
    for entry, target in zip(manifest["shards"], sorted(sens.glob("*.tar"))):
        (fake / entry["name"]).symlink_to(target)
    return fake


def test_encode_flux_encode_and_every_reader_refuse_tars_linked_into_the_fence(world):
    from pipeline.data.encode import encode_tree
    from pipeline.data.shards import read_manifest, shard_paths
    from pipeline.data.streaming import describe
    from pipeline.flux.encode import EncoderPaths, encode_shards, source_shards

    root, sens, _ = world
    fake = _linked_set(root, sens)
    plain = root / "plain-tars"  # flux_encode's other input: a bare directory of *.tar, no manifest
    plain.mkdir()
    for tar in sorted(sens.glob("*.tar")):
        (plain / tar.name).symlink_to(tar)
    dotdot = root / "public" / ".." / "sensitive"
    for call in (lambda: encode_tree(fake, root / "enc", root / "no-vae"),
                 lambda: describe(str(fake), None, job="train"),
                 lambda: list(iter_samples(fake)),
                 lambda: shard_paths(fake, read_manifest(fake)),
                 lambda: source_shards(plain),
                 lambda: read_manifest(dotdot),
                 lambda: encode_tree(dotdot, root / "enc", root / "no-vae")):
        with pytest.raises(PermissionError, match="sensitive shard set|outside its directory") as err:
            call()
        assert "\n" not in str(err.value)
    folders = {}
    for name in ("vae", "clip", "clip_tokenizer", "t5", "t5_tokenizer"):
        (root / "flux" / name).mkdir(parents=True)
        folders[name] = str(root / "flux" / name)
    for src in (plain, fake):
        with pytest.raises(PermissionError, match="sensitive shard set|outside its directory"):
            encode_shards(src, root / "flux-out", EncoderPaths(**folders), size=16)
    assert not (root / "enc").exists() and not (root / "flux-out").exists()


def test_nothing_in_pipeline_imports_privacy():
    """The fence lives below every reader: pipeline/ never reaches up into privacy/."""
    from test_import_graph import import_graph, modules

    graph = import_graph(modules())
    up = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("pipeline") for d in deps
                if d.startswith("privacy"))
    assert not up, up


# ---- the ledger fails closed --------------------------------------------------------------------------------------

def test_a_release_killed_between_output_and_ledger_blocks_until_resolved(world, capsys, monkeypatch):
    """The outputs of a release are complete but its commit never happens (killed, full disk): the reservation
    written before the first byte blocks every further release - one line saying how to resolve it - and once
    resolved the release counts, so a second independent draw of the same images is still refused."""
    root, sens, _ = world

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between the outputs and the ledger commit")

    monkeypatch.setattr(ledger, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        release(sens, root / "r1", 0.59)
    monkeypatch.undo()
    monkeypatch.setenv("FLOWRAIL_PRIVACY_LEDGER", str(root / "fence-home" / "ledger"))
    assert (root / "r1" / "release.json").is_file()  # a complete release, published, with no commit
    rid = read_release(root / "r1")["release_id"]
    base = ["privacy", "release", "--sensitive", str(sens), "--noise-std", "0.8"]
    _refused(base + ["--out", str(root / "r2")], capsys, root, f"flowrail privacy resolve {rid}")
    other = _write(root / "other", _images(30, seed=5), sensitive=True)  # any set: the ledger is blocked
    _refused(["privacy", "release", "--sensitive", str(other), "--noise-std", "0.8", "--out", str(root / "r3")],
             capsys, root, "was never committed")
    rc, _ = _cli(["privacy", "resolve", rid], capsys)
    assert rc == 0
    _refused(base + ["--out", str(root / "r2")], capsys, root, "second independent release")
    _refused(base + ["--out", str(root / "r2"), "--derive-from", str(root / "r1")], capsys, root,
             "is resolved_by_hand in the ledger, not committed")


def test_a_resharded_copy_of_released_images_gets_no_independent_draw(world, capsys):
    """The same images under new keys, in other shards, in another directory (the benchmark's fresh copies):
    recognised by content, refused an independent release; a strict superset too."""
    root, sens, items = world
    release(sens, root / "r1", 0.59)
    copy = [(f"copy-{i}", im, c) for i, (_, im, c) in enumerate(reversed(items))]
    _write(root / "resharded", copy, per_shard=7, sensitive=True)
    _refused(["privacy", "release", "--sensitive", str(root / "resharded"), "--noise-std", "0.8", "--out",
              str(root / "r2")], capsys, root, f"{N} of the {N} images")
    _write(root / "bigger", copy[:5] + [(f"new-{i}", im, c) for i, (_, im, c) in enumerate(_images(20, seed=3))],
           sensitive=True)
    _refused(["privacy", "release", "--sensitive", str(root / "bigger"), "--noise-std", "0.8", "--out",
              str(root / "r3")], capsys, root, "5 of the 25 images")


# ---- secrets ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,why", [("0" * 32, "one repeated symbol"), ("xy" * 16, "repeats a 2-symbol pattern"),
                                      ("password" * 4, "repeats a 8-symbol pattern"),
                                      ("0123456789abcdefghijklmnopqrstuv", "arithmetic run"),
                                      ("abcabdacbdcabdbcadbcabdcbadcbabdac", "distinct symbols"),
                                      ("1122334411223345112233441122334", "distinct symbols")])
def test_weak_secrets_are_refused(world, capsys, text, why):
    """Length alone passed 32 '0' characters, and the sample keys fed to the PRF are guessable: a grid over a few
    candidate secrets recovered x. A constant, repeated, run-like or low-alphabet secret is refused."""
    root, sens, _ = world
    (root / "keys").mkdir()
    (root / "keys" / "s").write_text(text)
    _refused(["privacy", "release", "--sensitive", str(sens), "--noise-std", "0.59", "--out", str(root / "r"),
              "--secret-file", str(root / "keys" / "s")], capsys, root, str(root / "keys" / "s"))
    _, lines = _cli(["privacy", "release", "--sensitive", str(sens), "--noise-std", "0.59", "--out", str(root / "r"),
                     "--secret-file", str(root / "keys" / "s")], capsys)
    assert why in lines[0]


def test_a_strong_user_secret_and_the_generated_default_pass(world):
    root, sens, _ = world
    (root / "keys").mkdir()
    (root / "keys" / "s").write_text(os.urandom(32).hex())
    out = release(sens, root / "r", 0.59, secret_file=root / "keys" / "s")
    assert out.manifest["counts"]["noisy"] == N


# ---- consent ------------------------------------------------------------------------------------------------------

def test_a_consent_list_from_outside_the_fence_is_refused(world, capsys):
    """A caller-chosen list would publish any 10% (or, with the flag, all) of the set in the clear. The list must be
    the data owner's, inside the fence: one outside, or a link inside the fence pointing out, is refused."""
    root, sens, _ = world
    outside = root / "mine.txt"
    outside.write_text("\n".join(f"s{i:04d}" for i in range(N)) + "\n")
    base = ["privacy", "release", "--sensitive", str(sens), "--noise-std", "0.59", "--out", str(root / "r"),
            "--allow-large-clean-fraction"]
    _refused(base + ["--consent-list", str(outside)], capsys, root, "lies outside the sensitive set's fence")
    # (the owner's fence holds a link planted to point out: resolved, it is outside)
    os.symlink(outside, sens / "linked.txt")
    _refused(base + ["--consent-list", str(sens / "linked.txt")], capsys, root, "linked.txt")
    (sens / "linked.txt").unlink()
    rc, _ = _cli(base[:-1] + ["--consent-list", str(sens / "consent.txt")], capsys)
    assert rc == 0
    digest = hashlib.sha256((sens / "consent.txt").read_bytes()).hexdigest()
    rid = read_release(root / "r")["release_id"]
    assert read_release(root / "r")["consent"]["list_sha256"] == digest
    assert ledger.read_record(sens, rid)["consent_sha256"] == digest


# ---- the audit cannot be forged or shopped ------------------------------------------------------------------------

def _privacy_checkpoint(path: Path, release_dir: Path, run_id: str | None = None) -> Path:
    from test_privacy_gate import _checkpoint

    return _checkpoint(path, privacy=True, run_id=run_id, release=str(release_dir))


def _registry(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    return uri, c, c.create_run(c.create_experiment("t")).info.run_id


def test_a_forged_audit_record_does_not_unlock_register(world, capsys):
    """A hand-written ``{"passed": true, "weights_sha256": ...}``, and a record signed with the attacker's own key
    whose public key was written into the release.json too: ``register`` refuses both (exit 2, one line, nothing
    registered) - only the ledger's key, inside the fence, signs a record it accepts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.gate import AUDIT_FILE, AuditGateError, _canonical, _weights_sha, audit_status, require_audit_passed

    root, sens, _ = world
    rel = release(sens, root / "r1", 0.59).out_dir
    uri, c, run_id = _registry(root)
    ckpt = _privacy_checkpoint(root / "ckpt", rel, run_id)
    sha = _weights_sha(ckpt)
    (ckpt / AUDIT_FILE).write_text(json.dumps({"passed": True, "weights_sha256": sha}))
    assert audit_status(ckpt) == "forged"
    register = ["register", str(ckpt), "--name", "faces", "--tracking-uri", uri]
    _refused(register, capsys, root, "whose audit is forged")

    mine = Ed25519PrivateKey.generate()
    pub = mine.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    body = {"passed": True, "loosened": False, "verdict": "passed", "weights_sha256": sha,
            "release_id": read_release(rel)["release_id"], "criterion": {}, "audited": "now", "report": {}}
    (ckpt / AUDIT_FILE).write_text(json.dumps({"body": body, "signature": mine.sign(_canonical(body)).hex(),
                                               "public_key": pub}))
    manifest = json.loads((rel / "release.json").read_text())
    (rel / "release.json").write_text(json.dumps({**manifest, "audit_public_key": pub}))
    assert audit_status(ckpt) == "forged"
    with pytest.raises(AuditGateError, match="whose audit is forged"):
        require_audit_passed(ckpt)  # what register runs first (the CLI path is exercised above)
    assert c.search_registered_models() == []


def test_a_loosened_audit_needs_the_accept_flag_and_is_recorded(world, capsys):
    from privacy.gate import LOOSENED, audit_status, require_audit_passed, write_audit_record

    root, sens, _ = world
    rel = release(sens, root / "r1", 0.59).out_dir
    rid = read_release(rel)["release_id"]
    uri, c, run_id = _registry(root)
    ckpt = _privacy_checkpoint(root / "ckpt", rel, run_id)
    write_audit_record(ckpt, {"passed": True, "criterion": {"max_extraction_rate": 0.5, "nn_floor_factor": 0.5}}, rid)
    assert audit_status(ckpt) == LOOSENED
    _refused(["register", str(ckpt), "--name", "faces", "--tracking-uri", uri], capsys, root,
             "--accept-loosened-audit")
    _refused(["evaluate", str(ckpt)], capsys, root, "--accept-loosened-audit")
    from jobs.cli import main

    with pytest.raises(SystemExit):  # the flag the refusal names exists on evaluate too
        main(["evaluate", "--help"])
    assert "--accept-loosened-audit" in capsys.readouterr().out
    assert require_audit_passed(ckpt, accept_loosened=True) == {"privacy.audit": LOOSENED,
                                                               "privacy.audit_loosened_accepted": "true"}
    strict = _privacy_checkpoint(root / "strict", rel)  # other weights: the defaults, or stricter, are a plain pass
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.arange(4.0) * 7}, str(strict / "ema.safetensors"))
    write_audit_record(strict, {"passed": True, "criterion": {"max_extraction_rate": 0.005,
                                                              "nn_floor_factor": 0.7}}, rid)
    assert require_audit_passed(strict) == {"privacy.audit": "passed"}


def test_seed_shopping_does_not_pass_the_gate(world):
    """Re-running the audit with new seeds until one passes: every audit of these weights counts, kept in the
    ledger; the checkpoint's own file cannot hide a failure (deleting it and re-auditing still fails)."""
    from privacy.gate import AUDIT_FILE, AuditGateError, audit_status, require_audit_passed, write_audit_record

    root, sens, _ = world
    rel = release(sens, root / "r1", 0.59).out_dir
    rid = read_release(rel)["release_id"]
    ckpt = _privacy_checkpoint(root / "ckpt", rel)
    write_audit_record(ckpt, {"passed": False, "seed": 0}, rid)
    (ckpt / AUDIT_FILE).unlink()
    write_audit_record(ckpt, {"passed": True, "seed": 1}, rid)
    write_audit_record(ckpt, {"passed": True, "seed": 2}, rid)
    assert audit_status(ckpt) == "failed"
    with pytest.raises(AuditGateError, match="audit is failed"):
        require_audit_passed(ckpt)


def test_copying_released_images_at_s_0_2_fails_the_audit():
    """At s = 0.2 the noisy copies themselves count as extractions of their originals almost always, so a floor of
    "the release's own extraction rate" let a model that copies 90% of the released images pass. Copying a noisy
    copy now counts as a released-image extraction, and the release's own rate never raises the bar."""
    import torch

    from privacy.audit import carlini_extraction, split_extraction, upper_bound
    from privacy.audit_run import criterion

    g = torch.Generator().manual_seed(0)
    train = torch.rand(300, 1, 8, 8, generator=g) * 2 - 1
    noisy = train + 0.2 * torch.randn(train.shape, generator=g)
    own = carlini_extraction(noisy.clamp(-1, 1), train).fraction
    assert own > 0.9  # the release alone "extracts" nearly every original
    generated = torch.cat([noisy[:270], torch.rand(30, 1, 8, 8, generator=g) * 2 - 1]).clamp(-1, 1)
    consented = torch.zeros(300, dtype=torch.bool)
    split = split_extraction(carlini_extraction(generated, train), consented,
                             carlini_extraction(generated, noisy.clamp(-1, 1)))
    assert split["released_extracted_frac"] >= 0.9
    out = {"num_generated": 300, "gen_released_extracted_upper95": split["released_extracted_upper95"],
           "gen_released_nn_l2_p05": 1.0, "floor_nn_l2_p05": 0.1, "noisy_recon_extracted_frac": own}
    passed, why = criterion(out)
    assert not passed and "released-image extraction" in why[0]
    assert criterion({**out, "gen_released_extracted_upper95": upper_bound(0, 300)})[0]


def test_a_checkpoint_path_into_the_fence_is_refused(world, tmp_path):
    """``init_from``, ``evaluate``, ``register`` and the audit find checkpoints through one function: a checkpoint
    path that is, or links into, a fence is refused there."""
    from pipeline.train.checkpoint_read import find_latest
    from test_privacy_gate import _checkpoint

    root, sens, _ = world
    inner = _checkpoint(sens / "ckpt", privacy=False)
    (root / "link").symlink_to(inner)
    for path in (inner, root / "link"):
        with pytest.raises(PermissionError, match="sensitive shard set"):
            find_latest(path)


def test_two_concurrent_independent_releases_give_one_release(world):
    """Two releases of the same images started together: the check and the reservation happen under one lock, so
    exactly one goes ahead; the other is refused (pending reservation, or already released)."""
    import threading

    root, sens, _ = world
    results: dict[str, object] = {}

    def go(name: str, s: float) -> None:
        try:
            results[name] = release(sens, root / name, s)
        except Exception as exc:  # noqa: BLE001 (any other error fails the test below)
            results[name] = exc

    threads = [threading.Thread(target=go, args=(f"r{i}", 0.5 + 0.1 * i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], ValueError), results
    assert "never committed" in str(errors[0]) or "second independent release" in str(errors[0])
    assert len([r for r in ledger.records() if r["state"] == ledger.COMMITTED]) == 1


def test_a_release_recorded_by_the_old_per_set_ledger_still_counts(world, capsys):
    """Fail closed across the upgrade: a release recorded only in the set's old per-set ledger blocks an independent
    release and any level not above it."""
    root, sens, _ = world
    old = sens / ".flowrail-privacy" / "releases"
    old.mkdir(parents=True)
    (old / "ab12.json").write_text(json.dumps({"release_id": "ab12", "created": "2026-01-01T00:00:00Z",
                                               "noise_std": 0.59, "keys": {}, "consented": {}}))
    _refused(["privacy", "release", "--sensitive", str(sens), "--noise-std", "0.8", "--out", str(root / "r")], capsys,
             root, "second independent release")


def test_check_tree_refuses_a_folder_that_links_into_the_fence(world):
    """For copies that must follow links (a model folder from a cache of links): every target is checked."""
    from pipeline.data.fence import check_tree

    root, sens, _ = world
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    check_tree(model, "register")
    (model / "weights.bin").symlink_to(sorted(sens.glob("*.tar"))[0])
    with pytest.raises(PermissionError, match="sensitive shard set"):
        check_tree(model, "register")


def test_flowrail_shards_refuses_an_image_folder_linking_into_the_fence(world):
    """`flowrail shards` from an image folder: an image that links into a fence is refused before any is read."""
    from PIL import Image

    from pipeline.data.sources import write_image_folder

    root, sens, _ = world
    (sens / "raw").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(sens / "raw" / "face.png")
    folder = root / "images" / "cls0"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(folder / "ok.png")
    (folder / "z.png").symlink_to(sens / "raw" / "face.png")
    with pytest.raises(PermissionError, match="sensitive shard set"):
        write_image_folder(root / "images", root / "out", size=None, channels=1)
    assert not (root / "out").exists()


def test_every_privacy_subcommand_prints_its_help():
    """(`privacy release --help` raised on the '%' of '10%' in a help string.)"""
    from jobs.privacy import SUBCOMMANDS

    for name, run in SUBCOMMANDS.items():
        if name == "train":
            continue  # its help is the config's
        with pytest.raises(SystemExit) as done:
            run(["--help"])
        assert done.value.code == 0, name


def test_register_refuses_an_autoencoder_folder_linking_into_the_fence(world):
    """`register` copies the autoencoder folder following links: a weight file linked into a fence is refused before
    anything is copied."""
    from pipeline.registry import copy_autoencoder

    root, sens, _ = world
    vae = root / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    copy_autoencoder(vae, root / "copied_ok")
    assert (root / "copied_ok" / "config.json").exists()
    (vae / "diffusion_pytorch_model.safetensors").symlink_to(sorted(sens.glob("*.tar"))[0])
    with pytest.raises(PermissionError, match="sensitive shard set"):
        copy_autoencoder(vae, root / "copied")
    assert not (root / "copied").exists()
