"""Checkpoints are verified before anything is loaded: per-rank manifests of SHA-256 hashes (HMAC-signed with the
job's key when it has one), and DeepSpeed's engine state read weights-only. Real DeepSpeed engine (CPU, gloo,
world 1); the split of the hashing over ranks on two spawned gloo ranks."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig, TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.checkpoint_trust import KEY_ENV, MANIFEST_DIR, file_sha256
from spawn_ranks import run_ranks

INFO = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=4)
CFG = TrainJobConfig(train=TrainConfig(zero_stage=2, lr=1e-2, stage0_single_worker=False),
                     model={"hidden_size": 16, "depth": 1, "num_heads": 2})
OPTIM = "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _engine(seed: int):
    from pipeline.models import build_model
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine

    torch.manual_seed(seed)
    model = build_model(CFG.model, in_channels=1, input_size=8, num_classes=10)
    return build_engine(model, CFG.train, micro_batch=4, world_size=1), EMA(model, 0.9)


@pytest.fixture(scope="module")
def saved(ds_process_group, tmp_path_factory):
    """A world-1 ZeRO-2 checkpoint written without a key (module scope: copied by each test before changing it)."""
    engine, ema = _engine(0)
    root = tmp_path_factory.mktemp("trust") / "ckpt"
    ckpt_io.save(root, engine=engine, ema=ema, state=ckpt_io.TrainState(step=3), cfg=CFG, info=INFO, rank=0)
    return root


@pytest.fixture()
def fresh(saved):
    return _engine(7)


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _rehash(ckpt: Path, name: str) -> None:
    """What an attacker who can write the storage (but holds no key) does: fix the manifest's hash up."""
    path = ckpt / MANIFEST_DIR / "rank0.json"
    body = json.loads(path.read_text())
    body["manifest"]["files"][name] = file_sha256(ckpt / name)
    path.write_text(json.dumps(body))


def test_manifest_lists_every_loaded_file(saved):
    body = json.loads((saved / MANIFEST_DIR / "rank0.json").read_text())
    files = body["manifest"]["files"]
    assert {ckpt_io.META, ckpt_io.EMA_FILE, "rng/rank0.pt", OPTIM, "deepspeed/state/mp_rank_00_model_states.pt"} \
        <= set(files)
    assert all(file_sha256(saved / name) == digest for name, digest in files.items())
    assert body["hmac_sha256"] is None  # no key in this job


@pytest.mark.parametrize("change", ["flip a byte", "add a file", "remove a file"])
def test_changed_checkpoint_is_refused_before_anything_loads(saved, fresh, tmp_path, change):
    ckpt = _copy(saved, tmp_path)
    if change == "flip a byte":
        data = bytearray((ckpt / OPTIM).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / OPTIM).write_bytes(bytes(data))
        named = OPTIM
    elif change == "add a file":
        named = "deepspeed/state/zero_pp_rank_0_mp_rank_00_extra.pt"
        (ckpt / named).write_bytes(b"x")
    else:
        named = "rng/rank0.pt"
        (ckpt / named).unlink()
    engine, ema = fresh
    before = _weights(engine)
    with pytest.raises(CheckpointError) as err:
        ckpt_io.restore(ckpt, engine=engine, ema=ema, rank=0, world=1)
    message = str(err.value)
    assert "\n" not in message and named in message and str(ckpt) in message, message
    after = _weights(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded


def test_signed_checkpoint_needs_the_jobs_key(ds_process_group, tmp_path, monkeypatch):
    """With a key, a manifest rewritten by someone without it is refused; so is one signed with another key and
    an unsigned (older) checkpoint. The right key loads it."""
    monkeypatch.setenv(KEY_ENV, "job-secret-1")
    engine, ema = _engine(0)
    ckpt = tmp_path / "signed"
    ckpt_io.save(ckpt, engine=engine, ema=ema, state=ckpt_io.TrainState(step=3), cfg=CFG, info=INFO, rank=0)
    assert json.loads((ckpt / MANIFEST_DIR / "rank0.json").read_text())["hmac_sha256"]
    fresh_engine, fresh_ema = _engine(7)
    assert ckpt_io.restore(ckpt, engine=fresh_engine, ema=fresh_ema, rank=0, world=1).step == 3

    tampered = Path(shutil.copytree(ckpt, tmp_path / "tampered"))
    torch.save({"torch": torch.get_rng_state(), "data_position": [9, 9, 9]}, tampered / "rng" / "rank0.pt")
    _rehash(tampered, "rng/rank0.pt")
    with pytest.raises(CheckpointError, match=r"manifest/rank0.json is not signed with this job's checkpoint key"):
        ckpt_io.restore(tampered, engine=fresh_engine, ema=fresh_ema, rank=0, world=1)
    monkeypatch.setenv(KEY_ENV, "another-job")
    with pytest.raises(CheckpointError, match="is not signed with this job's checkpoint key"):
        ckpt_io.restore(ckpt, engine=fresh_engine, ema=fresh_ema, rank=0, world=1)
    unsigned = Path(shutil.copytree(ckpt, tmp_path / "unsigned"))
    shutil.rmtree(unsigned / MANIFEST_DIR)
    with pytest.raises(CheckpointError, match="has no signed manifest"):
        ckpt_io.restore(unsigned, engine=fresh_engine, ema=fresh_ema, rank=0, world=1)


class Payload:
    """Unpickling this runs code: it writes the file named in its reduce tuple."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_code_in_engine_state_never_runs(saved, fresh, tmp_path):
    """Without a key the manifest only proves integrity: an attacker rewrites a ZeRO file and its hash. The engine
    state is still read weights-only (DeepSpeed 0.19 would unpickle with weights_only=False and run the payload)."""
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / OPTIM, weights_only=False)  # the test's own file
    state["payload"] = Payload(str(marker))
    torch.save(state, ckpt / OPTIM)
    _rehash(ckpt, OPTIM)
    engine, ema = fresh
    with pytest.raises(CheckpointError) as err:
        ckpt_io.restore(ckpt, engine=engine, ema=ema, rank=0, world=1)
    assert "weights-only" in str(err.value) and OPTIM.rsplit("/", 1)[-1] in str(err.value), str(err.value)
    assert not marker.exists()


def test_a_checkpoint_from_before_manifests_loads_without_a_key(saved, fresh, tmp_path, capsys):
    ckpt = _copy(saved, tmp_path)
    shutil.rmtree(ckpt / MANIFEST_DIR)
    engine, ema = fresh
    assert ckpt_io.restore(ckpt, engine=engine, ema=ema, rank=0, world=1).step == 3
    assert "has no manifest" in capsys.readouterr().out


def _verify_rank(rank: int, init_file: str, ckpt: str, bad: str) -> str:
    """Two ranks of one node check a two-rank checkpoint, each hashing half of the files."""
    import torch.distributed as dist

    from pipeline.train.checkpoint_trust import verify, write_manifest

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        root = Path(ckpt)
        for name in (f"rng/rank{rank}.pt", f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(os.urandom(64))
        if rank == 0:
            (root / "ema.safetensors").write_bytes(b"ema")
        write_manifest(root, rank, 5, pending={"flowrail.json": b"{}"} if rank == 0 else None)
        if rank == 0:
            (root / "flowrail.json").write_bytes(b"{}")
        dist.barrier()
        verify(root, 2, local=(rank, 2))  # untouched: passes on both
        dist.barrier()
        if rank == 0:
            (root / bad).write_bytes(b"changed")
        dist.barrier()
        try:
            verify(root, 2, local=(rank, 2))
        except CheckpointError as exc:
            return str(exc)
        return ""
    finally:
        dist.destroy_process_group()


def test_ranks_split_the_hashing_and_all_name_the_bad_file(tmp_path):
    """The file is hashed by one rank only (files are dealt round-robin to a node's ranks); both raise the same
    line naming it."""
    bad = "rng/rank1.pt"
    out = run_ranks(_verify_rank, (str(tmp_path / "init"), str(tmp_path / "ckpt"), bad), nprocs=2,
                    out_dir=tmp_path / "out", timeout_s=120)
    assert out[0] == out[1] and bad in out[0] and "does not match its manifest's SHA-256" in out[0], out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resuming_a_tampered_checkpoint_ends_the_run_with_one_line(trained_digits, tmp_path):
    """A re-run of the shared 2-worker run (a copy of its storage) whose latest checkpoint had a ZeRO partition
    changed in storage: every worker refuses it before DeepSpeed loads anything, the user error is not retried,
    and the run ends with one line naming the file (the CLI prints it and exits 2)."""
    from pipeline.train.checkpoint import find_latest
    from pipeline.train.trainer import fit

    cfg, _ = trained_digits
    shutil.copytree(Path(cfg.run_dir) / "ray" / cfg.run_name, tmp_path / "ray" / cfg.run_name)
    latest = find_latest(tmp_path / "ray" / cfg.run_name)
    name = "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray((latest / name).read_bytes())
    data[-100] ^= 0x01
    (latest / name).write_bytes(bytes(data))
    rerun = cfg.model_copy(update={"run_dir": str(tmp_path),
                                   "train": cfg.train.model_copy(update={"steps": cfg.train.steps + 15})})
    with pytest.raises(CheckpointError) as err:
        fit(rerun, make_grid=False)
    message = str(err.value)
    assert "\n" not in message and name in message and str(tmp_path) in message, message
