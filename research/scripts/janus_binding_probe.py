"""Can the ShapesWorld Janus-Pro captioner learn where objects are? A diagnostic with paired data, not a method.

Trains only the captioning direction of a fresh ShapesWorld Janus-Pro (the recipe's sizes; its VQ model is left
untrained, captions never read it) on one caption task, AdamW at the pre-training learning rate, and every
``--every`` steps reports the mean caption loss and a held-out test of places (``test``; 0.5 = blind to places):
for ``relation``, ``relation_audit``'s swap test (the right relation caption scored on its scene and on the scene
with its two objects swapped); for the others, the caption with the true row word against the other row word.
Writes JSON.

``--features vision``: the real SigLIP path; ``--position-code A`` replaces its learned position embeddings by a
fixed, frozen row + column code of amplitude A (so place is in every image token's input); ``--vision-from
FOLDER`` takes a trained base's vision encoder and aligner, frozen (what its features carry, read afresh).
``--features oracle``: SigLIP bypassed; each of the 16 image tokens is a fixed random projection of one-hot(the
object in its quadrant, or empty) + one-hot(its row) + one-hot(its column): what is there and where, exactly.
``--features words``: as ``oracle``, but what is there is the language model's own input embeddings of the
object's colour and shape words (trained with it), so image tokens and caption words share one code.

``--task relation``: two-object scenes, relation captions only (random subject, a valid relation), what the
swap test asks. ``--task place``: one-object scenes captioned "above" (top row) or "below": reading one object's
place, no binding. ``--task named-place``: two objects in different rows, captioned by one of them and its row
("a red circle above"): binding one named object to its place, nothing to compare. ``--task named-place-one``:
the same captions of one-object scenes (the row word after the object's words, nothing to bind).

``--qk-init STD`` draws the language model's query and key projections afresh with standard deviation STD (the
recipe's initialisation: 0.02); ``--feature-seed`` / ``--data-seed`` vary the oracle codes and the training data
apart from the initial weights (``--seed``); ``--warmup`` is the linear warm-up (50 steps).

    python research/scripts/janus_binding_probe.py --features oracle --task relation --steps 1600
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

TASKS = ("relation", "place", "named-place", "named-place-one")


def replace_features(backbone, token: Callable[[int, int, Any], torch.Tensor]) -> None:
    """Patch ``backbone`` so the features of image token (row, column) are ``token(row, col, object there or
    None)``, read from the judge's parse of the picture; SigLIP and the aligner are bypassed."""
    from suder.worlds import shapes

    side = int(math.isqrt(backbone.num_image_tokens))

    def features(picture) -> torch.Tensor:
        objects = shapes.parse_image(picture).objects  # one per quadrant
        cells = [divmod(t, side) for t in range(side * side)]
        return torch.stack([token(r, c, objects[(r * 2 // side) * 2 + c * 2 // side]) for r, c in cells])

    backbone.pixel_values = lambda pictures: torch.stack([features(p) for p in pictures])
    backbone.model.model.get_image_features = lambda feats, **_: SimpleNamespace(pooler_output=feats)


def oracle_features(backbone, width: int, seed: int = 0) -> None:
    """Image tokens = a fixed random projection of one-hot(object or empty) + one-hot(row) + one-hot(column)."""
    from suder.worlds import shapes

    objects = list(shapes.ALL_OBJECTS)
    side = int(math.isqrt(backbone.num_image_tokens))
    dims = len(objects) + 1 + 2 * side
    proj = torch.randn(dims, width, generator=torch.Generator().manual_seed(seed))

    def token(row: int, col: int, obj) -> torch.Tensor:
        code = torch.zeros(dims)
        code[objects.index(obj) if obj is not None else len(objects)] = 1
        code[len(objects) + 1 + row] = code[len(objects) + 1 + side + col] = 1
        return code @ proj

    replace_features(backbone, token)


def word_features(backbone, seed: int = 0) -> None:
    """Image tokens = the language model's own (trained) input embeddings of the object's colour and shape words
    plus a fixed random row and column code: image tokens that speak the words' language, so looking an object up
    by the words just written needs no learnt match between the two."""
    from suder.worlds import shapes

    side = int(math.isqrt(backbone.num_image_tokens))
    table = backbone.model.get_input_embeddings()
    tok = backbone.processor.tokenizer
    ids = {w: tok.encode(" " + w, add_special_tokens=False)[0] for w in (*shapes.COLORS, *shapes.SHAPES)}
    g = torch.Generator().manual_seed(seed)
    places = torch.randn(2 * side, table.weight.shape[1], generator=g) * float(table.weight.detach().std())

    def token(row: int, col: int, obj) -> torch.Tensor:
        what = table.weight[ids[obj.color]] + table.weight[ids[obj.shape]] if obj is not None else 0
        return what + places[row] + places[side + col]

    replace_features(backbone, token)


def position_code(backbone, amplitude: float) -> None:
    """Replace SigLIP's position embeddings by a frozen one-hot row + column code of the given amplitude."""
    emb = backbone.model.model.vision_model.embeddings.position_embedding.weight
    n, side = emb.shape[0], int(math.isqrt(emb.shape[0]))
    code = torch.zeros_like(emb)
    for i in range(n):
        row, col = divmod(i, side)
        code[i, row] = code[i, side + col] = amplitude / math.sqrt(2)
    with torch.no_grad():
        emb.copy_(code)
    emb.requires_grad_(False)


def vision_from(backbone, folder: str) -> None:
    """Copy a pre-trained model's vision encoder and aligner into ``backbone`` and freeze them: what a trained
    base's image features carry, read by a fresh language model."""
    from transformers import JanusForConditionalGeneration

    trained = JanusForConditionalGeneration.from_pretrained(folder).model
    for name in ("vision_model", "aligner"):
        part = getattr(backbone.model.model, name)
        part.load_state_dict(getattr(trained, name).state_dict())
        part.requires_grad_(False)


def redraw_query_key(backbone, std: float, seed: int = 0) -> None:
    """Draw the language model's query and key projections afresh from N(0, std^2) (the recipe: std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    for layer in backbone.model.model.language_model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            with torch.no_grad():
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * std)


def batch(task: str, rng: random.Random, size: int):
    """(scenes, captions) for one step of ``task``."""
    from suder.worlds import shapes

    def keep(s) -> bool:
        if task in ("place", "named-place-one"):
            return shapes.scene_kind(s) == "one"
        if task == "named-place":
            return shapes.scene_kind(s) == "two" and s.items()[0][0] // 2 != s.items()[1][0] // 2
        return shapes.scene_kind(s) == "two"

    scenes: list = []
    while len(scenes) < size:
        scenes += [s for s in shapes.sample_scenes(64, seed=rng.randrange(2**31)) if keep(s)]
    scenes = scenes[:size]
    captions = []
    for s in scenes:
        if task == "place":
            captions.append("above" if s.items()[0][0] < 2 else "below")
            continue
        if task in ("named-place", "named-place-one"):
            q, obj = rng.choice(s.items())
            captions.append(f"{shapes.phrase(obj)} {'above' if q < 2 else 'below'}")
            continue
        (qa, a), (qb, b) = s.items() if rng.random() < 0.5 else s.items()[::-1]
        relation = rng.choice([r for r in shapes.RELATIONS if shapes.relation_holds(r, qa, qb)])
        captions.append(f"{shapes.phrase(a)} {relation} {shapes.phrase(b)}")
    return scenes, captions


def row_test(model, task: str, num: int = 400, seed: int = 999) -> dict[str, float]:
    """``place`` / ``named-place``: on held-out scenes of the task, the fraction where the caption with the
    object's true row word scores higher than the same caption with the other one, and the mean gap (nats)."""
    from suder.worlds import shapes

    right, wrong, pictures = [], [], []
    for s in shapes.sample_scenes(num, seed=seed):
        kind = shapes.scene_kind(s)
        if task == "place" and kind == "one":
            q = s.items()[0][0]
            right.append("above" if q < 2 else "below"), wrong.append("below" if q < 2 else "above")
            pictures.append(shapes.render(s))
        named = (task == "named-place" and kind == "two" and s.items()[0][0] // 2 != s.items()[1][0] // 2) or (
            task == "named-place-one" and kind == "one")
        if named:
            for q, obj in s.items():
                word, other = ("above", "below") if q < 2 else ("below", "above")
                right.append(f"{shapes.phrase(obj)} {word}"), wrong.append(f"{shapes.phrase(obj)} {other}")
                pictures.append(shapes.render(s))
    model.eval()
    with torch.no_grad():
        gaps = model.logp_text_given_image(right, pictures).sum() - model.logp_text_given_image(wrong, pictures).sum()
    model.train()
    return {"right": (gaps > 0).float().mean().item(), "gap": gaps.mean().item(), "pairs": len(right)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", choices=("vision", "oracle", "words"), default="vision")
    ap.add_argument("--position-code", type=float, default=None, help="vision: frozen row+column code amplitude")
    ap.add_argument("--vision-from", default=None, help="vision: start the vision encoder and aligner from this "
                    "pre-trained janus-pro folder, frozen (the language model stays fresh)")
    ap.add_argument("--task", choices=TASKS, default="relation")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--first-task", choices=TASKS, default=None, help="a task trained first (a curriculum)")
    ap.add_argument("--first-steps", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (0: none)")
    ap.add_argument("--every", type=int, default=400)
    ap.add_argument("--qk-init", type=float, default=None, help="re-draw the language model's query and key "
                    "projections with this standard deviation (the recipe's: 0.02)")
    ap.add_argument("--text", type=json.loads, default=None, help="language model sizes (JSON)")
    ap.add_argument("--seed", type=int, default=2, help="the model's initial weights (and the defaults below)")
    ap.add_argument("--feature-seed", type=int, default=None, help="oracle / words: the random codes (default --seed)")
    ap.add_argument("--data-seed", type=int, default=None, help="the training scenes and captions (default --seed)")
    ap.add_argument("--out", default=None, help="default: research/results/binding-probe-<features>-<task>.json")
    args = ap.parse_args()
    if args.vision_from and (args.features != "vision" or args.position_code is not None):
        ap.error("--vision-from takes a trained base's vision encoder: use it with --features vision and no "
                 "--position-code")

    from agreement import relation_audit  # research/code (on PYTHONPATH)

    from suder.backbones.janus_pro.shapes_world import build_shapes_base
    from suder.worlds import shapes

    feature_seed = args.seed if args.feature_seed is None else args.feature_seed
    torch.manual_seed(args.seed)
    model = build_shapes_base(seed=args.seed, text=args.text, tokenizer_steps=0)
    if args.features == "words":
        word_features(model, feature_seed)
    elif args.features == "oracle":
        oracle_features(model, model.model.config.text_config.hidden_size, feature_seed)
    elif args.position_code is not None:
        position_code(model, args.position_code)
    if args.vision_from:
        vision_from(model, args.vision_from)
    if args.qk_init is not None:
        redraw_query_key(model, args.qk_init, args.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    data_seed = args.seed if args.data_seed is None else args.data_seed
    rng, losses, log, start = random.Random(data_seed), [], [], time.perf_counter()
    first = args.first_steps if args.first_task else 0
    for step in range(1 - first, args.steps + 1):
        scenes, captions = batch(args.first_task if step < 1 else args.task, rng, args.batch_size)
        lp = model.logp_text_given_image(captions, [shapes.render(s) for s in scenes])
        loss = -(lp.sum().sum() / lp.mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
        losses.append(loss.item())
        if step > 0 and (step % args.every == 0 or step == args.steps):
            test = relation_audit(model)["caption_term_swap"] if args.task == "relation" else row_test(model, args.task)
            log.append({"step": step, "loss": sum(losses[-50:]) / len(losses[-50:]), "test": test,
                        "seconds": time.perf_counter() - start})
            print(json.dumps(log[-1]), flush=True)
    default = Path(__file__).resolve().parents[1] / "results" / f"binding-probe-{args.features}-{args.task}.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "log": log}, f, indent=2)


if __name__ == "__main__":
    main()
