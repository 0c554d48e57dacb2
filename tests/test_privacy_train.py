"""SFBD flow as a Ray Train + DeepSpeed job: 2 workers, the denoised pool refreshes, MLflow holds it; audit runs;
a SIGKILLed worker resumes through the shared training loop to the weights of an uninterrupted run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config
from privacy.boundary import mark_sensitive
from privacy.config import PrivacyTrainConfig
from privacy.release import release

SECRET = b"test secret for the privacy stage, 256+ bits"


@pytest.fixture(scope="module")
def released(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    sensitive = root / "sensitive"
    shutil.copytree(digits_shards / "train", sensitive)  # a copy: the shared digits set stays public
    from pipeline.data.shards import iter_samples

    keys = [k for k, _ in iter_samples(sensitive)]  # read before the fence closes
    mark_sensitive(sensitive)
    (sensitive / "consent.txt").write_text("\n".join(keys[::11]) + "\n")  # 9%, inside the fence
    out = release(sensitive, root / "release", 0.59, secret=SECRET, consent_list=sensitive / "consent.txt",
                  release_labels=True, samples_per_shard=256)
    return root, sensitive, out


def _cfg(root, release_dir, **extra):
    base = {"run_dir": str(root / "runs"), "privacy.release": str(release_dir), "data.batch_size": 32,
            "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 2,
            "train.steps": 30, "train.log_every": 5, "train.checkpoint_every": 30, "train.lr": 2e-3,
            "sampler.steps": 4, "samples.per_class": 1, "privacy.warmup_steps": 10, "privacy.refresh_every": 5,
            "privacy.refresh_size": 16, "privacy.denoise_steps": 3, "privacy.ramp_end": 20}
    base.update(extra)
    return load_config(PrivacyTrainConfig, None, [f"{k}={v}" for k, v in base.items()])


# 2 workers, checkpoints at 10/20/30, one restart allowed: a kill after step 27 resumes from step 20
KILLED = {"train.num_workers": 2, "train.zero_stage": 2, "train.checkpoint_every": 10, "train.max_failures": 1}


def _leak_patterns(sensitive, release_dir):
    """Every form a non-consented sensitive image could take in a file: its uint8 bytes, its float32 / float16
    [-1, 1] CHW bytes, and the sha256 hex of its uint8 bytes (and of the sensitive shards)."""
    import hashlib

    import numpy as np

    from pipeline.data.shards import iter_samples, read_manifest
    from privacy.ledger import read_record
    from privacy.release import read_release, to_signed_chw

    from pipeline.data.fence import inside

    consented = set(read_record(sensitive, read_release(release_dir)["release_id"])["consented"].values())
    with inside(sensitive):  # the test reads the originals to know what a leak would look like
        raw, hexes = [], {s["sha256"] for s in read_manifest(sensitive)["shards"]}
        samples = list(iter_samples(sensitive))
    for key, sample in samples:
        if key in consented:
            continue
        im = np.ascontiguousarray(sample["image.npy"])
        raw += [im.tobytes(), to_signed_chw(im).astype(np.float32).tobytes(),
                to_signed_chw(im).astype(np.float16).tobytes()]
        hexes.add(hashlib.sha256(im.tobytes()).hexdigest())
    return raw, hexes


class Scanner:
    """Counts occurrences of fixed byte patterns and sha256 hex strings in a file's bytes, fast enough for
    megabytes: each pattern is indexed by its most varied 8-byte window (an anchor); the data are read as uint64 words
    at each of the 8 byte offsets, ``np.isin`` finds anchor words, and only those candidates are compared in full."""

    def __init__(self, raw: list[bytes], hexes: set[str]) -> None:
        import numpy as np

        self.hexes = hexes
        self.index: dict[int, list[tuple[bytes, int]]] = {}
        for r in raw:
            off = max(range(len(r) - 7), key=lambda o: len(set(r[o:o + 8])))
            self.index.setdefault(int.from_bytes(r[off:off + 8], "little"), []).append((r, off))
        self.anchors = np.array(sorted(self.index), dtype=np.uint64)

    def hits(self, data: bytes) -> int:
        import re

        import numpy as np

        runs = re.findall(rb"[0-9a-f]{64,}", data)  # every 64-character window of every hex run
        found = sum(1 for run in runs for i in range(len(run) - 63) if run[i:i + 64].decode() in self.hexes)
        buf = np.frombuffer(data, dtype=np.uint8)
        for shift in range(8):
            n = (len(buf) - shift) // 8
            if n <= 0:
                continue
            words = buf[shift:shift + 8 * n].view("<u8")
            for w in np.nonzero(np.isin(words, self.anchors))[0]:
                pos = shift + 8 * int(w)
                for pattern, off in self.index[int(words[w])]:
                    start = pos - off
                    found += int(start >= 0 and data[start:start + len(pattern)] == pattern)
        return found


@pytest.mark.slow
@pytest.mark.timeout(1800)  # Ray Train run + audit (300 samples) + 2 registrations + the scan, on a loaded machine
def test_sfbd_flow_run_leaks_nothing_and_leaves_the_stage_only_through_the_audit(ray_local, released, mlflow_server,
                                                                                capfd, monkeypatch):
    """SFBD flow on 2 workers (ZeRO-2), rank 1 SIGKILLed after step 27: the group resumes from the checkpoint of
    step 20 (its denoised pool, counters and RNG included) through the shared training loop and takes again exactly
    the steps the killed attempt took (its window of steps 21-25 equals the killed attempt's); the full-weights
    comparison with an uninterrupted run is test_killed_privacy_run_resumes_to_the_uninterrupted_weights. The pool
    refreshes on schedule; no sample grid and no registration before the audit (an override is recorded); after a
    passing audit the grid is logged and `register` accepts it. Then every checkpoint, MLflow artifact, MLflow
    database and log line of the run is scanned for the non-consented sensitive images (bytes in uint8 / float32 /
    float16, sha256 of each image and shard): zero hits outside the fence."""
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.cli import main
    from privacy.audit_run import audit_checkpoint
    from privacy.train import fit_privacy

    root, sensitive, out = released
    monkeypatch.setenv("FLOWRAIL_FAULT_INJECT", "kill@1:27")  # after the checkpoint of step 20 and 3 refreshes
    cfg = _cfg(root, out.out_dir, run_name="flow", **KILLED, **{
        "tracking.tracking_uri": mlflow_server, "tracking.experiment": "privacy-e2e"})
    result = fit_privacy(cfg)
    assert (root / "runs" / "faults" / "flow" / ".fault-kill-r1-s27").is_file(), "the worker was not killed"
    m = result.metrics
    client = MlflowClient(mlflow_server)
    for key in ("loss", "pool_change", "sample_gradients", "denoise_sample_nfe", "denoised_weight"):
        at_25 = [x.value for x in client.get_metric_history(result.run_id, key) if x.step == 25]
        assert len(at_25) == 2 and at_25[0] == pytest.approx(at_25[1], rel=1e-6, abs=1e-9), (key, at_25)
    assert m["step"] == 30
    # refreshes at steps 10 (whole slice), 15, 20, 25 on each worker; each refresh changed reconstructions
    assert m["pool_refreshes"] == 4 and m["pool_change"] > 0 and m["denoised_weight"] == 1.0
    assert m["denoise_nfe"] == 6  # Heun, 3 steps
    # compute: 10 warm-up steps of one batch, step 10 (w = 0) one batch, 19 steps of two; x 2 workers x 32
    assert m["sample_gradients"] == 2 * 32 * (11 + 2 * 19)
    # the shared loop's resume record and metric spool: the same MLflow run went on from step 20
    assert [(x.step, x.value) for x in client.get_metric_history(result.run_id, "resumed_from_step")] == [(20, 20.0)]
    weights = [x.value for x in client.get_metric_history(result.run_id, "denoised_weight")]
    assert weights[0] == 0.0 and 0 < weights[2] < 1 and weights[-1] == 1.0
    params = client.get_run(result.run_id).data.params
    assert params["privacy.method"] == "sfbd_flow" and params["privacy.noise_std"] == "0.59"
    assert [a.path for a in client.list_artifacts(result.run_id)] == ["curves"]  # no sample grid before the audit

    ckpt = str(result.checkpoint)
    from privacy.gate import AuditGateError, log_sample_grid

    with pytest.raises(AuditGateError, match="audit is missing"):
        log_sample_grid(ckpt)
    assert main(["register", ckpt, "--name", "faces", "--tracking-uri", mlflow_server]) == 2
    assert "whose audit is missing" in capfd.readouterr().err
    assert main(["register", ckpt, "--name", "faces-override", "--tracking-uri", mlflow_server,
                 "--experiment", "privacy-e2e", "--override-privacy-audit"]) == 0
    v1 = client.get_model_version("faces-override", "1")
    assert v1.tags["privacy.audit_override"] == "true" and v1.tags["privacy.audit"] == "missing"
    assert client.get_run(result.run_id).data.tags["privacy.audit_override"] == "true"

    report = audit_checkpoint(ckpt, sensitive, release=out.out_dir, num_samples=300, features="pixels",
                              denoise_steps=3)
    assert report["num_consented"] == 131 and report["num_released"] == 1307
    assert report["passed"], report["fail_reasons"]
    assert report["noisy_recon_reid_frac"] > 0.5 and report["floor_nn_l2_p05"] > 0
    assert main(["register", ckpt, "--name", "faces", "--tracking-uri", mlflow_server,
                 "--experiment", "privacy-e2e"]) == 0
    assert client.get_model_version("faces", "1").tags["privacy.audit"] == "passed"
    log_sample_grid(ckpt)
    assert "samples" in [a.path for a in client.list_artifacts(result.run_id)]

    # the scan: everything this run wrote outside the fence
    scanner = Scanner(*_leak_patterns(sensitive, out.out_dir))
    server_root = Path(mlflow_server_root(mlflow_server))
    exp_id = client.get_experiment_by_name("privacy-e2e").experiment_id
    files = [p for p in root.rglob("*") if p.is_file() and sensitive not in p.parents]
    files += [p for p in (server_root / "artifacts" / exp_id).rglob("*") if p.is_file()]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files += [p for p in logs.rglob("*") if p.is_file()]
    assert any(p.name == "ema.safetensors" for p in files) and any(p.suffix == ".png" for p in files)
    assert any("MLmodel" == p.name for p in files)
    leaks = {str(p): n for p in files if (n := scanner.hits(p.read_bytes()))}
    captured = capfd.readouterr()
    leaks["captured output"] = scanner.hits((captured.out + captured.err).encode())
    assert sum(leaks.values()) == 0, {k: v for k, v in leaks.items() if v}
    # the scan finds them where they are: inside the fence
    inside = b"".join(p.read_bytes() for p in sensitive.glob("*.tar"))
    assert scanner.hits(inside) >= 1300  # every non-consented image's uint8 bytes are in the sensitive shards


@pytest.mark.slow
@pytest.mark.exhaustive  # CI: the test above proves the resumed steps equal the killed attempt's (no second run)
def test_killed_privacy_run_resumes_to_the_uninterrupted_weights(ray_local, released, monkeypatch):
    """A privacy run killed after step 27 and resumed from step 20 ends with the EMA weights and the metrics of an
    uninterrupted run with the same settings (the pool, counters and draws are restored, not redone)."""
    from safetensors.torch import load_file

    from pipeline.train.checkpoint import EMA_FILE
    from privacy.train import fit_privacy

    root, _, out = released
    monkeypatch.setenv("FLOWRAIL_FAULT_INJECT", "kill@1:27")
    killed = fit_privacy(_cfg(root, out.out_dir, run_name="resume-killed", **KILLED))
    assert (root / "runs" / "faults" / "resume-killed" / ".fault-kill-r1-s27").is_file()
    monkeypatch.delenv("FLOWRAIL_FAULT_INJECT")
    whole = fit_privacy(_cfg(root, out.out_dir, run_name="resume-whole", **KILLED))
    ours, theirs = load_file(str(killed.checkpoint / EMA_FILE)), load_file(str(whole.checkpoint / EMA_FILE))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-5, worst
    for key in ("loss", "pool_refreshes", "pool_change", "sample_gradients", "denoise_sample_nfe"):
        assert killed.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-5), key


def mlflow_server_root(uri: str) -> str:
    """The session MLflow server's root directory (conftest starts it with sqlite + local artifacts under it)."""
    import psutil

    port = uri.rsplit(":", 1)[1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "mlflow" in " ".join(cmd) and "--artifacts-destination" in cmd and port in cmd:
            return str(Path(cmd[cmd.index("--artifacts-destination") + 1]).parent)
    raise AssertionError(f"no mlflow server process for {uri}")


def test_privacy_train_refuses_sensitive_sets_and_bad_settings(ray_local, released):
    from privacy.train import fit_privacy

    root, sensitive, out = released
    with pytest.raises(PermissionError, match="sensitive shard set"):
        fit_privacy(_cfg(root, out.out_dir, **{"privacy.clean_shards": str(sensitive)}))
    with pytest.raises(ValueError, match="data.image_size=16"):
        fit_privacy(_cfg(root, out.out_dir, **{"data.image_size": 16}))
    with pytest.raises(ValueError, match="warmup_steps"):
        fit_privacy(_cfg(root, out.out_dir, **{"privacy.warmup_steps": 30}))


@pytest.mark.slow
def test_a_worker_user_error_is_recorded_so_restarts_do_not_repeat_it(ray_local, digits_shards, tmp_path,
                                                                      monkeypatch):
    """A release with one consented image and two workers: one worker gets no clean sample (a DataError in the
    worker). The run ends with that one line, and the error is recorded in the run's storage, where every
    restarted worker group (train.max_failures) re-raises it before building anything."""
    import json

    from pipeline.errors import DataError
    from pipeline.data.shards import iter_samples
    from pipeline.tracking import run_record
    from privacy.train import fit_privacy

    # the session ledger already holds a release of these digits (fixture `released`): the ledger is keyed by
    # content, so this second world gets a ledger of its own
    monkeypatch.setenv("FLOWRAIL_PRIVACY_LEDGER", str(tmp_path / "ledger"))
    sensitive = tmp_path / "sensitive"
    shutil.copytree(digits_shards / "train", sensitive)
    first_key = next(iter(iter_samples(sensitive)))[0]
    mark_sensitive(sensitive)
    (sensitive / "consent.txt").write_text(first_key + "\n")
    out = release(sensitive, tmp_path / "release", 0.59, secret=SECRET, consent_list=sensitive / "consent.txt",
                  release_labels=True, samples_per_shard=256)
    cfg = _cfg(tmp_path, out.out_dir, **{"train.num_workers": 2, "train.max_failures": 1})
    with pytest.raises(DataError, match="got no clean samples") as err:
        fit_privacy(cfg)
    assert "\n" not in str(err.value)
    marker = json.loads((run_record(cfg.base()).parent / "user_error.json").read_text())
    assert marker["name"] == "DataError" and "got no clean samples" in marker["message"]
