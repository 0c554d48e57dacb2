"""The next epoch's stream starts in the background; what it yields is the stream the loop would have built."""
from __future__ import annotations

import threading

import pytest

from pipeline.errors import DataError
from pipeline.train.worker import EpochPrefetch


def _streams(log: list[tuple[int, str]]):
    def epoch_batches(epoch: int):
        log.append((epoch, threading.current_thread().name))
        if epoch == 9:
            raise DataError("shard-000009.tar: truncated")
        yield from ({"x": epoch * 100 + i} for i in range(3))
    return epoch_batches


def test_started_epoch_is_taken_whole_and_built_off_the_main_thread():
    log: list[tuple[int, str]] = []
    prefetch = EpochPrefetch(_streams(log))
    prefetch.start(1)
    batches, first = prefetch.take(1)
    assert first == {"x": 100} and [b["x"] for b in batches] == [101, 102]
    assert log[0][0] == 1 and log[0][1] != threading.current_thread().name
    assert prefetch.take(1) is None  # taken once
    prefetch.close()


def test_other_epoch_or_nothing_started_gives_none():
    prefetch = EpochPrefetch(_streams([]))
    assert prefetch.take(0) is None
    prefetch.start(2)
    assert prefetch.take(3) is None  # a stale prefetch is dropped, the loop builds epoch 3 itself
    prefetch.close()


def test_read_error_of_prefetched_epoch_surfaces_at_take():
    prefetch = EpochPrefetch(_streams([]))
    prefetch.start(9)
    with pytest.raises(DataError, match="shard-000009.tar"):
        prefetch.take(9)
    prefetch.close()
