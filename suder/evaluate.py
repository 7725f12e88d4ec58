"""Judged evaluation on ShapesWorld: text-to-image accuracy per family and caption accuracy.

Held-out sets are fixed by ``seed`` (default 999, never used for training data): ``num`` grammar prompts with
balanced families, one image each at the model's guidance scale and temperature 1; ``num`` scenes captioned at
temperature 1 (sampled) and greedily (what ``suder caption`` does by default).
"""

from __future__ import annotations

from typing import Any

import torch

EVAL_SEED = 999


@torch.no_grad()
def evaluate(model: Any, num: int = 400, seed: int = EVAL_SEED, batch: int = 100, what=("t2i", "caption")) -> dict:
    """``{"t2i": {single, pair, count, relation, overall, n}, "caption": {...}, "caption_greedy": {...}}``."""
    from .worlds import shapes

    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(seed)
    if "t2i" in what:
        prompts = shapes.sample_prompts(num, seed=seed)
        images = []
        for i in range(0, num, batch):
            images += model.sample_image(prompts[i : i + batch], generator=gen).images
        out["t2i"] = shapes.t2i_accuracy(prompts, images)
    if "caption" in what:
        scenes = shapes.sample_scenes(num, seed=seed)
        pictures = [shapes.render(s) for s in scenes]
        for key, temperature in (("caption", 1.0), ("caption_greedy", 0.0)):
            texts: list[str] = []
            for i in range(0, num, batch):
                texts += model.sample_text(pictures[i : i + batch], generator=gen, temperature=temperature).texts
            out[key] = shapes.caption_accuracy(scenes, texts)
            out[key]["words"] = sum(len(t.split()) for t in texts) / max(len(texts), 1)
    model.train(was_training)
    return out


def headline(result: dict) -> dict[str, float]:
    """The three numbers a before/after table shows."""
    return {
        "t2i": result.get("t2i", {}).get("overall", float("nan")),
        "caption": result.get("caption", {}).get("overall", float("nan")),
        "caption_greedy": result.get("caption_greedy", {}).get("overall", float("nan")),
    }


def ranking_agreement(rewards: torch.Tensor, judge: torch.Tensor, group_size: int) -> dict[str, float]:
    """How a reward ranks each group of samples against the judge (1 or 0 per sample), two ways:

    - ``agree``: among groups where the judge separates the reward's best and worst sample (``decisive``), the
      fraction where the best is the one the judge accepts (what SimPO's best-vs-worst pair sees; the training
      monitor ``{direction}/judge_agree``);
    - ``auc``: over every (accepted, rejected) pair of samples in the same group, the fraction the reward orders
      correctly (ties count half); ``mixed`` groups hold both kinds.
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
    from .rewards import judge_generation, judge_understanding
    from .worlds import shapes

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
        judge = torch.cat(judged)
        for name, score in scores.items():
            rewards = torch.cat([score(s).float().cpu() for s in drawn])
            out[direction][name] = ranking_agreement(rewards, judge, group_size)
    model.train(was_training)
    return out
