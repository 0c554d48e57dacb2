"""The privacy benchmark's protocol (benchmarks/privacy/): the warm-up plateau, the pool refresh that re-denoises
every copy, FLOP counts, and its refusals (one line, exit 2) before anything runs."""
from __future__ import annotations

import pytest

from benchmarks.privacy import protocol as P
from benchmarks.privacy.run import main


def test_warmup_plateau_is_the_best_point_once_patience_runs_out():
    curve = [(100, 300.0), (200, 80.0), (300, 40.0), (400, 39.5), (500, 41.0), (600, 39.9)]
    assert P.plateau_step(curve, patience=3, tol=0.02, budget=600) == 300  # 39.5 is not 2% better than 40
    with pytest.raises(P.BenchInputError, match=r"no validation plateau within --warmup-budget=600 steps"):
        P.plateau_step(curve, patience=4, tol=0.02, budget=600)
    still_falling = [(100 * k, 300.0 / k) for k in range(1, 7)]
    with pytest.raises(P.BenchInputError, match="fd still falling"):
        P.plateau_step(still_falling, patience=2, tol=0.02, budget=600)
    assert P.best_point(curve) == (400, 39.5)


def test_pool_refresh_re_denoises_every_copy_the_asked_number_of_times():
    r = P.pool_refresh(1380, refresh_every=20, pool_period=200, redenoise=10)
    assert r.size == 138 and r.period == 200 and r.steps == 2000 and r.redenoised == 10
    # a pool the chunk does not divide: the period is the steps until every copy was refreshed once
    r = P.pool_refresh(1000, refresh_every=20, pool_period=200, redenoise=10, refresh_size=300)
    assert r.period == 80 and r.steps == 800
    with pytest.raises(P.BenchInputError, match=r"refresh of 2000 copies is larger than the pool \(1380"):
        P.pool_refresh(1380, 20, 200, 10, refresh_size=2000)


def test_flops_count_forward_backward_and_denoising():
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64, bias=False)

        def forward(self, x, t, y=None):
            return self.lin(x.flatten(1)).reshape(x.shape)

    f = P.forward_flops(Tiny(), 1, 8, 10)
    assert f == 2 * 64 * 64
    assert P.run_flops(f, sample_gradients=10, denoise_sample_nfe=4) == f * 34
    assert P.steps_for_flops(f * 3 * 64 * 100, f, 64) == 100


@pytest.mark.parametrize("argv, message", [
    (["--part", "main", "--clean-fraction", "0"], "--clean-fraction=0 leaves no clean set for clean_only, sfbd_flow"),
    (["--part", "main", "--refresh-size", "5000"], "refresh of 5000 copies is larger than the pool (1380 per worker)"),
    (["--part", "frontier", "--frontier-fractions", "0.04,0"], "--clean-fraction=0 leaves no clean set"),
    (["--part", "main", "--warmup-budget", "300"], "--warmup-budget=300 steps hold fewer than --patience + 1"),
    (["--part", "main", "--methods", "sfbd_flow"], "clean_only first"),
])
def test_bad_benchmark_settings_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out"), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything ran
