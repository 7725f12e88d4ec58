"""Reward-judge agreement (``agreement.ranking_agreement`` / ``reward_agreement``), the measurement behind
Show-o's estimator study, and the relation audit. Not part of the suite: ``python -m pytest research/code``."""

from __future__ import annotations

import math

import pytest
import torch
from agreement import ranking_agreement, relation_audit, reward_agreement


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
    # best-of-4 by the reward: g0 0.9 (accepted), g1 3.0 (rejected), g2 first 1.0 (accepted), g3 first 2.0
    # (accepted); worst: g0 0.1 (rejected), g1 0.0 (accepted), g2 first 1.0 (accepted), g3 first 0.0 (rejected)
    assert out["best"] == pytest.approx(3 / 4) and out["worst"] == pytest.approx(2 / 4)
    assert out["sampled"] == pytest.approx(10 / 16)


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
    import agreement

    monkeypatch.setattr(agreement, "judge_generation", _parity_of_images)
    monkeypatch.setattr(agreement, "judge_understanding", _parity_of_captions)
    gen = {"judge": _parity_of_images, "anti": lambda s: -_parity_of_images(s)}
    und = {"judge": _parity_of_captions, "anti": lambda s: -_parity_of_captions(s)}
    out = reward_agreement(tiny_toy, gen, und, num=12, group_size=4, seed=3, batch=5)
    for direction in ("gen", "und"):
        good, bad = out[direction]["judge"], out[direction]["anti"]
        assert good["groups"] == 12 and 0 < good["mixed"] == good["decisive"] == bad["mixed"], (direction, good)
        assert good["agree"] == good["auc"] == 1.0 and bad["agree"] == bad["auc"] == 0.0
        # every mixed group's reward-best is accepted under the judge as reward, rejected under its negation
        assert good["best"] - bad["best"] == pytest.approx(good["mixed"] / 12) and good["sampled"] == bad["sampled"]


class _Scores:
    def __init__(self, values):
        self.values = values

    def sum(self):
        return self.values


class _DirectionModel:
    """A stand-in model whose generation side knows relations exactly (log p(image | caption) = 0 if the judge
    accepts the caption for the image, else -3) and whose captioner knows none (every caption scores -1); it
    captions every scene with its true caption, except that two different objects in one row get the relation
    reversed."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def sample_text(self, pictures, generator=None, temperature=1.0):
        from types import SimpleNamespace

        from suder.worlds import shapes

        texts = []
        for p in pictures:
            scene = shapes.parse_image(p)
            items = scene.items()
            if shapes.scene_kind(scene) == "two" and items[0][0] // 2 == items[1][0] // 2:
                (_, a), (_, b) = items  # a is left of b
                texts.append(f"{shapes.phrase(a)} to the right of {shapes.phrase(b)}")
            else:
                texts.append(shapes.true_caption(scene))
        return SimpleNamespace(texts=texts)

    def logp_image_given_text(self, images, captions, policy="cond"):
        from suder.worlds import shapes

        ok = [shapes.satisfies(shapes.parse_image(im), c) for im, c in zip(images, captions)]
        return _Scores(torch.tensor([0.0 if o else -3.0 for o in ok]))

    def logp_text_given_image(self, captions, images):
        return _Scores(torch.full((len(captions),), -1.0))


class _WordPriorModel(_DirectionModel):
    """A captioner that knows the direction (a caption the judge rejects scores 2 nats less) but prefers the words
    "to the left of" and "above" by 5 nats whatever the image."""

    def logp_text_given_image(self, captions, images):
        from suder.worlds import shapes

        ok = [shapes.satisfies(shapes.parse_image(im), c) for im, c in zip(images, captions)]
        prior = [5.0 if ("to the left of" in c or "above" in c) else 0.0 for c in captions]
        return _Scores(torch.tensor([p + (0.0 if o else -2.0) for p, o in zip(prior, ok)]))


def test_relation_audit_says_which_side_knows_the_direction():
    """The generation side ranks the right relation above the reversed one every time (3 nats), and the true scene
    above the one with its objects swapped; the captioner never (a tie); greedy captions fail exactly the
    two-object scenes that share a row."""
    out = relation_audit(_DirectionModel(), num=60, seed=5, batch=7)
    assert out["image_term"] == pytest.approx({"right": 1.0, "gap": 3.0})
    assert out["image_term_swap"] == pytest.approx({"right": 1.0, "gap": 3.0})
    assert out["caption_term"] == out["caption_term_swap"] == pytest.approx({"right": 0.0, "gap": 0.0})
    assert out["greedy"]["two/row"] == 0.0 and out["greedy"]["two/col"] == out["greedy"]["one"] == 1.0
    rows_and_cols = sum(k in ("two/row", "two/col") for k in out["greedy"])
    assert rows_and_cols == 2 and out["pairs"] > 0 and out["pairs"] % 2 == 0


def test_relation_audit_swap_sees_past_a_word_prior():
    """A captioner that knows every direction but prefers one relation word by more than it knows: right vs reversed
    caption lands at exactly 0.5 (each scene's two subject orders cancel), the swapped scene finds it right always."""
    out = relation_audit(_WordPriorModel(), num=60, seed=5, batch=7)
    assert out["caption_term"]["right"] == pytest.approx(0.5)
    assert out["caption_term_swap"] == pytest.approx({"right": 1.0, "gap": 2.0})
