"""A resumed run's remote checkpoint: the node's local rank 0 downloads it once, every rank reads that copy, it is
deleted after all have read it, and a failed download stops every rank with one line naming the checkpoint."""
from __future__ import annotations

from pathlib import Path

from spawn_ranks import run_ranks


def _remote(path: str):
    """A ``ray.train.Checkpoint`` on a filesystem that is not pyarrow's LocalFileSystem, as an S3 one would be."""
    import pyarrow.fs
    from ray.train import Checkpoint

    return Checkpoint(path, filesystem=pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem()))


def _restore_rank(rank: int, init_file: str, ckpt: str, tmp: str) -> dict:
    import tempfile

    import torch.distributed as dist

    from pipeline.errors import CheckpointError
    from pipeline.train.restore_download import restored_checkpoint_dir

    tempfile.tempdir = tmp
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with restored_checkpoint_dir(_remote(ckpt), local_rank=rank, node_rank=0) as local:
            out = {"dir": str(local), "files": sorted(str(p.relative_to(local)) for p in local.rglob("*")
                                                      if p.is_file()),
                   "meta": (local / "flowrail.json").read_text()}
        try:
            with restored_checkpoint_dir(_remote(ckpt + "-missing"), local_rank=rank, node_rank=0):
                out["missing"] = "entered"
        except CheckpointError as exc:
            out["missing"] = str(exc)
        return out
    finally:
        dist.destroy_process_group()


def test_one_download_per_node_read_by_every_rank_then_removed(tmp_path: Path):
    ckpt = tmp_path / "bucket" / "run" / "checkpoint_000010"
    (ckpt / "deepspeed").mkdir(parents=True)
    (ckpt / "flowrail.json").write_text('{"step": 10}')
    (ckpt / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    downloads = tmp_path / "node-tmp"
    downloads.mkdir()
    results = run_ranks(_restore_rank, (str(tmp_path / "init"), str(ckpt), str(downloads)), nprocs=2,
                        out_dir=tmp_path / "out", timeout_s=120)
    assert results[0]["dir"] == results[1]["dir"] != str(ckpt)  # one copy on the node, not the bucket path
    for rank in (0, 1):
        assert results[rank]["files"] == ["deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "flowrail.json"]
        assert results[rank]["meta"] == '{"step": 10}'
        assert results[rank]["missing"].startswith(f"could not download checkpoint {ckpt}-missing to resume from: ")
    assert "FileNotFoundError" in results[0]["missing"]  # the rank that downloaded says why
    assert not list(downloads.iterdir())  # removed once both ranks had read it


def test_a_local_checkpoint_is_read_in_place(tmp_path: Path):
    import pyarrow.fs
    from ray.train import Checkpoint

    from pipeline.train.restore_download import restored_checkpoint_dir

    checkpoint = Checkpoint(str(tmp_path), filesystem=pyarrow.fs.LocalFileSystem())
    with restored_checkpoint_dir(checkpoint, local_rank=1, node_rank=3) as local:  # no collective, no copy
        assert local == tmp_path
