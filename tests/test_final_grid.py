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
