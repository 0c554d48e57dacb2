"""Memorization audit statistics on constructed cases."""
from __future__ import annotations

import torch

from privacy.audit import (audit_reconstructions, audit_samples, carlini_extraction, max_cosine_similarity,
                           normalized_l2, unit_pixels)


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
    assert memorized["maxcos_pixels_train_ref_mean"] == novel["maxcos_pixels_train_ref_mean"]

    inner = train[:50] * 0.9  # away from the clamp at 1
    rec = audit_reconstructions(inner + 0.01, inner)
    assert rec["recon_reid_frac"] == 1.0 and abs(rec["recon_own_l2_mean"] - 0.005) < 1e-6
    shuffled = audit_reconstructions(_train(50, seed=3), train[:50])
    assert shuffled["recon_reid_frac"] < 0.2
