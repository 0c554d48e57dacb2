"""A rank's epoch stream (pipeline.data.epoch_stream): shuffled in windows of whole files, resumable at a position
by reading only the files from that position on."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.epoch_stream import FILE_COLUMN, StreamPosition, files_per_window, windowed_batches


def _blocks(sizes: list[int], first_file: int = 0, block: int = 37) -> list[dict[str, np.ndarray]]:
    """Blocks in file order as a reader gives them: sample ids ``file * 1000 + i``, cut every ``block`` samples
    regardless of file boundaries (read_webdataset's Decode re-batches across files)."""
    files = np.concatenate([np.full(n, f, np.int64) for f, n in enumerate(sizes)])[sum(sizes[:first_file]):]
    ids = np.concatenate([f * 1000 + np.arange(n) for f, n in enumerate(sizes)])[sum(sizes[:first_file]):]
    return [{FILE_COLUMN: files[i:i + block], "id": ids[i:i + block]} for i in range(0, len(ids), block)]


@pytest.mark.parametrize("per_window", [1, 3])
def test_resumed_stream_equals_the_rest_of_the_uninterrupted_one_at_every_position(per_window):
    sizes = [50, 0, 23, 61, 7, 40, 33, 0, 58]  # uneven files (bad samples dropped), two without any good sample
    kw = dict(batch_size=16, per_window=per_window, seed=3, epoch=2, rank_key=1, shuffle=True)
    full = list(windowed_batches(_blocks(sizes), **kw))
    assert len(full) == sum(sizes) // 16  # the incomplete last batch is dropped
    ids = np.concatenate([b["id"] for b, _ in full])
    assert len(set(ids.tolist())) == len(ids)  # no sample twice
    assert not np.array_equal(ids, np.sort(ids))  # shuffled ...
    windows = [f // per_window for f in ids // 1000]
    assert windows == sorted(windows)  # ... only within windows of whole files
    assert [p.batches for _, p in full] == list(range(1, len(full) + 1))
    for k, (_, position) in enumerate(full):
        first_file = position.window * per_window  # what a resumed reader reads from
        resumed = list(windowed_batches(_blocks(sizes, first_file), start=position, **kw))
        assert len(resumed) == len(full) - k - 1
        for (a, pa), (b, pb) in zip(resumed, full[k + 1:]):
            assert np.array_equal(a["id"], b["id"]) and pa == pb
        assert all(FILE_COLUMN not in b for b, _ in resumed)


def test_no_shuffle_keeps_file_order_and_windows_fit_the_buffer():
    sizes = [20, 20, 20]
    out = list(windowed_batches(_blocks(sizes), batch_size=10, per_window=1, seed=0, epoch=0, rank_key=0,
                                shuffle=False))
    assert np.array_equal(np.concatenate([b["id"] for b, _ in out]),
                          np.concatenate([f * 1000 + np.arange(20) for f in range(3)]))
    assert out[1][1] == StreamPosition(1, 0, 2) and out[2][1] == StreamPosition(1, 10, 3)
    assert files_per_window(0, 256) == 1 and files_per_window(512, 256) == 2 and files_per_window(600, 256) == 3
    assert files_per_window(100, 256) == 1


@pytest.mark.parametrize(("world", "rank", "shuffle_buffer"), [(1, 0, 300), (2, 1, 0)])
def test_resumed_ray_epoch_reads_fewer_files_and_yields_the_same_batches(ray_local, digits_shards, world, rank,
                                                                         shuffle_buffer):
    """Through real Ray Data on the digits shards (6 files): the epoch stream resumed at a mid-epoch position reads
    only the files from that position's window on and yields exactly the uninterrupted epoch's remaining batches,
    in the same order, on the same rank."""
    from pipeline.data.streaming import describe, epoch_stream

    paths, info = describe(str(digits_shards / "train"), None)
    kw = dict(policy="skip", seed=5, epoch=1, rank=rank, world=world, batch_size=32, shuffle_buffer=shuffle_buffer)
    stream, files = epoch_stream(paths, info, **kw)
    full = [(b["label"].copy(), b["image"].copy(), p) for b, p in stream]
    assert len(full) >= 10
    cut = len(full) // 2 + 1
    position = full[cut - 1][2]
    assert position.window >= 1  # the cut lies past the first window: files can be left out
    resumed_stream, resumed_files = epoch_stream(paths, info, start=position, **kw)
    resumed = [(b["label"], b["image"], p) for b, p in resumed_stream]
    per_window = files_per_window(shuffle_buffer, info.num_samples / len(paths))
    assert resumed_files == files[position.window * per_window:] and len(resumed_files) < len(files)
    assert len(resumed) == len(full) - cut
    for (la, xa, pa), (lb, xb, pb) in zip(resumed, full[cut:]):
        assert np.array_equal(la, lb) and np.array_equal(xa, xb) and pa == pb


def test_file_index_finds_files_in_the_forms_readers_report_them(tmp_path, monkeypatch):
    """Ray's readers report s3:// files without their scheme and local files absolute."""
    from pipeline.data.epoch_stream import FileIndex
    from pipeline.errors import DataError

    index = FileIndex(["s3://bench/pixels/shard-000004.tar", "s3://bench/pixels/shard-000001.tar"], first=3)
    assert index("bench/pixels/shard-000004.tar") == 3 and index("s3://bench/pixels/shard-000001.tar") == 4
    monkeypatch.chdir(tmp_path)
    local = FileIndex(["data/shard-0.tar"])
    assert local(str(tmp_path / "data" / "shard-0.tar")) == 0 and local("data/shard-0.tar") == 0
    with pytest.raises(DataError, match="other.tar"):
        index("bench/pixels/other.tar")
    assert list(local.column([str(tmp_path / "data" / "shard-0.tar")], [3])) == [0, 0, 0]
