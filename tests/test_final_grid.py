"""The run's final grid is at most 64 samples: ImageNet's 1,000 classes x 8 per class on the head node's CPU (about
4 M SiT-XL/2 forward passes with the shipped sampler) kept the run from ever reaching FINISHED."""
from __future__ import annotations

import pytest

from pipeline.train.trainer import FINAL_GRID_MAX_IMAGES, grid_classes


@pytest.mark.parametrize("num_classes,per_class,classes,each", [
    (1000, 8, [0, 125, 250, 375, 500, 625, 750, 875], 8),  # the shipped sit-xl2-imagenet256: 64, not 8,000
    (10, 2, list(range(10)), 2),  # digits, as the tests train it: every class still fits
    (10, 8, [0, 1, 2, 3, 5, 6, 7, 8], 8),
    (0, 8, [0], 8),  # unconditional: one row
    (1000, 500, [0], 64),  # more per class than the grid holds
])
def test_grid_is_at_most_64_samples(num_classes, per_class, classes, each):
    got, got_each = grid_classes(num_classes, per_class)
    assert (got, got_each) == (classes, each)
    assert len(got) * got_each <= FINAL_GRID_MAX_IMAGES == 64


def test_the_driver_downloads_only_metadata_and_ema(tmp_path):
    """A checkpoint on a non-local filesystem (here pyarrow's SubTreeFileSystem over a folder, as S3 would be): the
    driver's copy holds flowrail.json and ema.safetensors, not the ZeRO engine state or the ranks' RNG files."""
    from types import SimpleNamespace

    import pyarrow.fs

    from pipeline.train.checkpoint import EMA_FILE, META, find_latest
    from pipeline.train.trainer import local_checkpoint

    remote = tmp_path / "bucket" / "run" / "checkpoint_1"
    for name, data in ((META, b'{"step": 5, "config": {}}'), (EMA_FILE, b"ema-bytes"),
                       ("deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", b"x" * 1000),
                       ("rng/rank0.pt", b"rng")):
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(data)
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    got = local_checkpoint(SimpleNamespace(filesystem=fs, path="run/checkpoint_1"), tmp_path / "driver")
    assert sorted(p.name for p in got.iterdir()) == sorted([META, EMA_FILE])
    assert (got / EMA_FILE).read_bytes() == b"ema-bytes" and find_latest(got) == got
    assert local_checkpoint(SimpleNamespace(filesystem=fs, path="run/checkpoint_1"), tmp_path / "driver") == got
