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
