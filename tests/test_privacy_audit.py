"""Memorization audit statistics on constructed cases."""
from __future__ import annotations

import torch

from privacy.audit import (audit_reconstructions, audit_samples, carlini_extraction, max_cosine_similarity, nn_floor,
                           normalized_l2, ratio_histogram, samples_for_zero_bound, split_extraction, unit_pixels,
                           upper_bound)
from privacy.audit_run import criterion


def _train(n: int = 200, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_normalized_l2_matches_definition():
    a, b = _train(5), _train(7, seed=1)
    ua, ub = unit_pixels(a), unit_pixels(b)
    d = normalized_l2(ua, ub)
    assert d.shape == (5, 7)
    direct = ((ua[2] - ub[4]) ** 2).sum().sqrt() / 64 ** 0.5
    assert torch.isclose(d[2, 4], direct)
    # [-1,1] -> [0,1] halves distances: identical images are 0 apart, opposite extremes are 1 apart
    assert normalized_l2(unit_pixels(-torch.ones(1, 64)), unit_pixels(torch.ones(1, 64)))[0, 0] == 1.0


def test_exact_copy_is_extracted_and_far_sample_is_not():
    train = _train()
    copies = train[[3, 17, 42]].clone()
    far = _train(3, seed=5)  # independent uniform images: nearest neighbour about as far as the 50 nearest
    ext = carlini_extraction(torch.cat([copies, far]), train)
    assert ext.extracted.tolist() == [True, True, True, False, False, False]
    assert ext.nearest[:3].tolist() == [3, 17, 42]
    assert torch.all(ext.ratio[3:] > 1.5)
    # a slightly perturbed copy is still extracted; alpha is honoured
    near_copy = (train[[8]] + 0.02 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert carlini_extraction(near_copy, train).extracted.item()
    assert not carlini_extraction(near_copy, train, alpha=0.01).extracted.item()


def test_max_cosine_excludes_self_for_reference():
    feats = torch.eye(4, dtype=torch.float64)
    feats[3] = feats[2] * 2  # 3 is a scaled duplicate of 2
    ref = max_cosine_similarity(feats, feats, exclude_self=True)
    assert ref.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert max_cosine_similarity(feats, feats).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_audit_samples_and_reconstructions_separate_copies_from_novel():
    train = _train()
    memorized = audit_samples(train[:40].clone(), train)
    novel = audit_samples(_train(40, seed=9), train)
    assert memorized["extracted_frac"] == 1.0 and novel["extracted_frac"] == 0.0
    assert memorized["nn_l2_mean"] == 0.0 < novel["nn_l2_mean"]
    assert memorized["maxcos_pixels_mean"] > 0.999 > novel["maxcos_pixels_mean"]

    inner = train[:50] * 0.9  # away from the clamp at 1
    rec = audit_reconstructions(inner + 0.01, inner)
    assert rec["recon_reid_frac"] == 1.0 and abs(rec["recon_own_l2_mean"] - 0.005) < 1e-6
    shuffled = audit_reconstructions(_train(50, seed=3), train[:50])
    assert shuffled["recon_reid_frac"] < 0.2


def test_zero_of_n_bounds_the_rate_below_one_percent_only_from_299_samples():
    assert samples_for_zero_bound(0.01) == 299
    assert upper_bound(0, 299) < 0.01 <= upper_bound(0, 298)
    assert abs(upper_bound(1, 100) - 0.0466) < 1e-3  # Clopper-Pearson, one-sided 95%
    assert upper_bound(0, 500) < upper_bound(1, 500) < upper_bound(2, 500)


def test_ratio_histogram_is_the_distribution():
    ratio = torch.tensor([0.2, 0.6, 0.9, 1.1, 1.4, 1.8, 3.0, 0.95])
    h = ratio_histogram(ratio, "r")
    assert h == {"r_frac_0_0.5": 0.125, "r_frac_0.5_0.75": 0.125, "r_frac_0.75_1": 0.25, "r_frac_1_1.25": 0.125,
                 "r_frac_1.25_1.5": 0.125, "r_frac_1.5_2": 0.125, "r_frac_2_up": 0.125}


def test_nn_floor_excludes_each_image_itself():
    train = _train(50)
    train[7] = train[3]  # a duplicate pair: their floor is 0, no other image's is
    floor = nn_floor(train, train, torch.arange(50))
    assert floor["floor_nn_l2_min"] == 0.0 and floor["floor_nn_l2_p05"] > 0.0
    assert nn_floor(train[[3]], train, torch.tensor([3]))["floor_nn_l2_mean"] == 0.0
    assert nn_floor(train[[0]], train, torch.tensor([0]))["floor_nn_l2_mean"] > 0.1


def test_criterion_needs_enough_samples_low_extraction_and_nn_above_the_floor():
    ok = {"num_generated": 300, "gen_released_extracted_upper95": 0.00995, "gen_released_nn_l2_p05": 0.06,
          "floor_nn_l2_p05": 0.1, "noisy_recon_extracted_frac": 0.0}
    assert criterion(ok) == (True, [])
    assert not criterion({**ok, "num_generated": 298})[0]
    assert not criterion({**ok, "gen_released_extracted_upper95": 0.02})[0]
    # the noisy release's own extraction rate is context, never a higher bar (tests/test_privacy_attacks.py)
    assert not criterion({**ok, "gen_released_extracted_upper95": 0.02, "noisy_recon_extracted_frac": 0.03})[0]
    passed, why = criterion({**ok, "gen_released_nn_l2_p05": 0.04})
    assert not passed and "real-vs-real floor" in why[0]


def test_copies_of_consented_images_are_not_counted_as_released_extraction():
    train = _train()
    consented = torch.zeros(200, dtype=torch.bool)
    consented[:10] = True
    generated = torch.cat([train[:6], train[50:52], _train(12, seed=4)])  # 6 consented copies, 2 released copies
    split = split_extraction(carlini_extraction(generated, train), consented)
    assert split["consented_extracted_count"] == 6 and split["released_extracted_count"] == 2
    assert split["released_extracted_frac"] == 0.1 and split["released_extracted_upper95"] > 0.1
