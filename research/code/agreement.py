"""Reward-judge agreement and the relation audit: diagnostics of ShapesWorld runs (research, not installed).

Moved out of ``suder.evaluate``; the results they produced are in research/README.md's notes and docs/results.md.

- ``ranking_agreement`` / ``reward_agreement``: how well a reward ranks a group of samples against the exact
  judge (``suder.worlds.judge``), for several ways of scoring the same samples (Show-o's estimator study,
  ``show_o_estimators.py``, and the best-of-G question "is the reward or the update the limit?").
- ``relation_audit``: does either direction of a model know which way a relation points (greedy accuracy per
  scene geometry, and the right vs reversed relation caption scored by each side, with a swap test)?

Run from the repository root with ``PYTHONPATH=research/code`` (README.md in this folder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from suder.evaluate import EVAL_SEED
from suder.worlds import shapes
from suder.worlds.judge import judge_generation, judge_understanding


def ranking_agreement(rewards: torch.Tensor, judge: torch.Tensor, group_size: int) -> dict[str, float]:
    """How a reward ranks each group of samples against the judge (1 or 0 per sample), two ways:

    - ``agree``: among groups where the judge separates the reward's best and worst sample (``decisive``), the
      fraction where the best is the one the judge accepts (what SimPO's best-vs-worst pair sees; the training
      monitor ``{direction}/judge_agree``);
    - ``auc``: over every (accepted, rejected) pair of samples in the same group, the fraction the reward orders
      correctly (ties count half); ``mixed`` groups hold both kinds;
    - ``best`` / ``worst``: the fraction of all groups whose reward-best / reward-worst sample the judge accepts,
      against ``sampled``, the fraction of all samples it accepts. ``best`` is what best-of-G selection by this
      reward would score: a reward that lifts it far above ``sampled`` holds the signal, so if training does not
      raise ``sampled`` the optimiser, not the reward, is what stops it.
    """
    r, j = rewards.float().view(-1, group_size), judge.float().view(-1, group_size)
    best, worst = r.argmax(-1), r.argmin(-1)
    rows = torch.arange(r.shape[0])
    jb, jw = j[rows, best], j[rows, worst]
    decisive = jb != jw
    diff = r[:, :, None] - r[:, None, :]  # [g, a, b]: r_a - r_b
    pairs = (j[:, :, None] == 1) & (j[:, None, :] == 0)
    wins = ((diff > 0).float() + 0.5 * (diff == 0).float())[pairs]
    return {
        "agree": (jb[decisive] > jw[decisive]).float().mean().item() if decisive.any() else float("nan"),
        "decisive": int(decisive.sum()),
        "auc": wins.mean().item() if wins.numel() else float("nan"),
        "mixed": int(pairs.any(-1).any(-1).sum()),
        "groups": r.shape[0],
        "sampled": j.mean().item(),
        "best": jb.mean().item(),
        "worst": jw.mean().item(),
    }


@torch.no_grad()
def reward_agreement(
    model: Any,
    gen_scores: dict[str, Any],
    und_scores: dict[str, Any],
    *,
    num: int = 64,
    group_size: int = 4,
    seed: int = EVAL_SEED + 1,
    batch: int = 16,
) -> dict[str, dict[str, dict[str, float]]]:
    """Reward-judge agreement of several ways of scoring the same samples (``ranking_agreement``), on ShapesWorld.

    ``num`` held-out prompts get ``group_size`` images each and ``num`` held-out scenes ``group_size`` sampled
    captions each, drawn once (temperature 1, the model's guidance); then every ``gen_scores[name](samples)`` /
    ``und_scores[name](samples)`` returns one reward per sample, to be compared with the judge.
    ``{"gen": {name: agreement}, "und": {...}}``.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, dict[str, float]]] = {"gen": {}, "und": {}}
    for direction, scores in (("gen", gen_scores), ("und", und_scores)):
        if not scores:
            continue
        if direction == "gen":
            inputs = shapes.sample_prompts(num, seed=seed)
        else:
            inputs = [shapes.render(s) for s in shapes.sample_scenes(num, seed=seed)]
        drawn, judged = [], []
        for i in range(0, num, batch):
            if direction == "gen":
                samples = model.sample_image(inputs[i : i + batch], num_samples=group_size, generator=gen)
                judged.append(judge_generation(samples))
            else:
                samples = model.sample_text(inputs[i : i + batch], num_samples=group_size, generator=gen)
                judged.append(judge_understanding(samples))
            drawn.append(samples)
        verdicts = torch.cat(judged)
        for name, score in scores.items():
            rewards = torch.cat([score(s).float().cpu() for s in drawn])
            out[direction][name] = ranking_agreement(rewards, verdicts, group_size)
    model.train(was_training)
    return out


@torch.no_grad()
def relation_audit(model: Any, num: int = 400, seed: int = EVAL_SEED, batch: int = 100) -> dict[str, Any]:
    """Does either direction know which way a relation points? On ShapesWorld's two-object scenes whose objects
    share a row or a column (one relation word is right, its opposite wrong), with the same held-out scenes as
    ``evaluate``:

    - ``greedy``: greedy-caption accuracy per scene geometry (``two/row``, ``two/col``, ``two/diag``, and the other
      kinds), the breakdown of ``caption_greedy``;
    - ``image_term`` / ``caption_term``: for each such scene and each subject, the right relation caption against
      the reversed one ("a A to the left of a B" vs "a A to the right of a B"), scored by the generation side,
      ``log p(image | caption)`` summed (the image term of the caption reward), and by the captioner,
      ``log p(caption | image)`` summed: ``right`` is the fraction of pairs where the right caption scores higher,
      ``gap`` the mean difference in nats.

    - ``image_term_swap`` / ``caption_term_swap``: the same right captions, each scored on its scene and on the
      scene with its two objects swapped (same objects, same caption, only their places differ): ``right`` is the
      fraction where the true scene scores higher. ``caption_term`` compares two captions, so a captioner that
      simply prefers one relation word lands at exactly 0.5 there (a scene's two subject orders cancel) whatever
      it sees; the swap keeps the caption fixed, so only what the captioner reads from the image counts.

    Dual self-rewards can only teach what one side knows: where both ``right`` fractions are near 0.5, nothing in
    the model tells "left of" from "right of", and a relation convention, right or flipped, is equally consistent
    for both directions.
    """
    was_training = model.training
    model.eval()
    scenes = shapes.sample_scenes(num, seed=seed)
    pictures = [shapes.render(s) for s in scenes]
    gen = torch.Generator().manual_seed(seed)
    captions: list[str] = []
    for i in range(0, num, batch):
        captions += model.sample_text(pictures[i : i + batch], generator=gen, temperature=0.0).texts

    def kind(scene: Any) -> str:
        k = shapes.scene_kind(scene)
        if k != "two":
            return k
        (qa, _), (qb, _) = scene.items()
        return "two/" + ("row" if qa // 2 == qb // 2 else "col" if qa % 2 == qb % 2 else "diag")

    kinds = [kind(s) for s in scenes]
    hits = [shapes.satisfies(s, c) for s, c in zip(scenes, captions)]
    greedy = {k: sum(h for h, kk in zip(hits, kinds) if kk == k) / kinds.count(k) for k in sorted(set(kinds))}
    right, wrong, images, swapped = [], [], [], []
    opposite = {"to the left of": "to the right of", "above": "below"}
    opposite |= {v: k for k, v in opposite.items()}
    for scene, picture, k in zip(scenes, pictures, kinds):
        if k not in ("two/row", "two/col"):
            continue
        (qa, a), (qb, b) = scene.items()
        objects = list(scene.objects)
        objects[qa], objects[qb] = b, a
        swap = shapes.render(dataclasses.replace(scene, objects=tuple(objects)))
        for (x, qx), (y, qy) in (((a, qa), (b, qb)), ((b, qb), (a, qa))):
            rel = next(r for r in shapes.RELATIONS if shapes.relation_holds(r, qx, qy))
            right.append(f"{shapes.phrase(x)} {rel} {shapes.phrase(y)}")
            wrong.append(f"{shapes.phrase(x)} {opposite[rel]} {shapes.phrase(y)}")
            images.append(picture)
            swapped.append(swap)
    out: dict[str, Any] = {"greedy": greedy, "pairs": len(right)}
    if right:
        for name, score in (
            ("image_term", lambda caps, imgs: model.logp_image_given_text(imgs, caps, policy="cond").sum()),
            ("caption_term", lambda caps, imgs: model.logp_text_given_image(caps, imgs).sum()),
        ):
            for key, (caps_b, imgs_b) in {name: (wrong, images), f"{name}_swap": (right, swapped)}.items():
                gaps = torch.cat(
                    [
                        score(right[i : i + batch], images[i : i + batch]).float().cpu()
                        - score(caps_b[i : i + batch], imgs_b[i : i + batch]).float().cpu()
                        for i in range(0, len(right), batch)
                    ]
                )
                out[key] = {"right": (gaps > 0).float().mean().item(), "gap": gaps.mean().item()}
    model.train(was_training)
    return out
