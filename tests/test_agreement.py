"""Reward-judge agreement (``suder.evaluate.ranking_agreement`` / ``reward_agreement``), the measurement behind
Show-o's estimator study."""

from __future__ import annotations

import math

import pytest
import torch

from suder.evaluate import ranking_agreement, reward_agreement


def test_ranking_agreement_by_hand():
    # group 0: best (0.9) accepted, worst (0.1) rejected -> decisive, agrees; pairs (a, r): 0.9>0.1, 0.5>0.1, 0.9 vs 0.1
    # group 1: best (3) rejected, worst (1) accepted -> decisive, disagrees; pairs: 1 vs 3 (wrong), 2 vs 3 (wrong)
    # group 2: all accepted -> not decisive, no pairs; group 3: a tie between accepted and rejected counts half
    rewards = torch.tensor([0.9, 0.5, 0.1, 0.5, 1.0, 2.0, 3.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0])
    judge = torch.tensor([1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    out = ranking_agreement(rewards, judge, group_size=4)
    assert out["decisive"] == 3  # group 3: best is index 12 (first max, accepted), worst index 14 (rejected)
    assert out["agree"] == pytest.approx(2 / 3)
    # pairs: g0 (0.9,0.5 vs 0.1, 0.5): 0.9>0.1, 0.9>0.5, 0.5>0.1, 0.5=0.5 -> 3.5 of 4
    # g1 (1.0, 2.0, 0.0 vs 3.0): 0 of 3; g3 (2.0 vs 2.0, 0, 0): 0.5 + 1 + 1 = 2.5 of 3
    assert out["auc"] == pytest.approx((3.5 + 0 + 2.5) / 10)
    assert out["mixed"] == 3 and out["groups"] == 4


def test_no_decisive_group_gives_nan():
    out = ranking_agreement(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]), group_size=2)
    assert math.isnan(out["agree"]) and math.isnan(out["auc"]) and out["decisive"] == 0


def _parity_of_images(samples):
    import numpy as np

    return torch.tensor([float(int(np.asarray(im, dtype=np.int64).sum()) % 2) for im in samples.images])


def _parity_of_captions(samples):
    return torch.tensor([float(len(t) % 2) for t in samples.texts])


def test_reward_agreement_scores_the_samples_it_judges(tiny_toy, monkeypatch):
    """With a stand-in judge (parity of the pixels / caption length: mixed verdicts even for a barely trained
    model), that judge as a reward agrees perfectly and its negation never: the samples scored are the ones
    judged, grouped per prompt / scene."""
    import suder.rewards

    monkeypatch.setattr(suder.rewards, "judge_generation", _parity_of_images)
    monkeypatch.setattr(suder.rewards, "judge_understanding", _parity_of_captions)
    gen = {"judge": _parity_of_images, "anti": lambda s: -_parity_of_images(s)}
    und = {"judge": _parity_of_captions, "anti": lambda s: -_parity_of_captions(s)}
    out = reward_agreement(tiny_toy, gen, und, num=12, group_size=4, seed=3, batch=5)
    for direction in ("gen", "und"):
        good, bad = out[direction]["judge"], out[direction]["anti"]
        assert good["groups"] == 12 and 0 < good["mixed"] == good["decisive"] == bad["mixed"], (direction, good)
        assert good["agree"] == good["auc"] == 1.0 and bad["agree"] == bad["auc"] == 0.0
