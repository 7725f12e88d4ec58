"""Which captions best vs worst puts in a SimPO pair, by group size, on the scenes a captioner gets wrong.

A diagnostic for ``und_group_size``: greedy-caption a model's training-distribution ShapesWorld scenes, keep the
scenes whose greedy caption the judge rejects, sample ``--samples`` captions for each at temperature 1, score them
with the caption reward a run uses (``dsr-consensus``: the image term plus the captioner's log-likelihood, both by
the model itself, as the frozen base scores at a run's start), then split each scene's samples into groups of G
and count, per G, what best vs worst of a group pairs: a right caption over the greedy caption (what would push
greedy decoding towards the right answer), over another wrong one, over a right one, or a wrong caption over a
right one (harm).

    HF_HUB_OFFLINE=1 python research/scripts/caption_pairs.py --model BASE --out caption-pairs.json   # ~4 min, 1 thread
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from suder.registry import load_backbone
from suder.rewards import RewardContext, dsr_consensus
from suder.worlds import shapes

KINDS = ("right>greedy", "right>wrong", "right>right", "wrong>right", "wrong>wrong")


def right(scene, caption: str) -> bool:
    return shapes.parse_prompt(caption) is not None and shapes.satisfies(scene, caption)


def pair_kinds(rewards: list[float], ok: list[bool], greedy: list[bool], size: int) -> Counter:
    """Best vs worst of each consecutive group of ``size`` samples (first index wins ties), classified."""
    out = Counter()
    for start in range(0, len(rewards) - size + 1, size):
        idx = range(start, start + size)
        best = max(idx, key=lambda i: (rewards[i], -i))
        worst = min(idx, key=lambda i: (rewards[i], i))
        out["groups"] += 1
        out["greedy_in_group"] += any(greedy[i] for i in idx)
        if ok[best] and greedy[worst]:
            out["right>greedy"] += 1
        key = f"{'right' if ok[best] else 'wrong'}>{'right' if ok[worst] else 'wrong'}"
        out[key] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a ShapesWorld janus-pro (or other backbone) model folder")
    ap.add_argument("--backbone", default="janus-pro")
    ap.add_argument("--scenes", type=int, default=600, help="training-distribution scenes to caption greedily")
    ap.add_argument("--samples", type=int, default=32, help="captions sampled per wrongly captioned scene")
    ap.add_argument("--sizes", default="2,4,8,16,32", help="group sizes G (each must divide --samples)")
    ap.add_argument("--seed", type=int, default=4321, help="scene seed (the held-out evaluation uses 999)")
    ap.add_argument("--out", default="caption-pairs.json")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.scenes < 1 or args.samples < 2 or any(g < 2 or args.samples % g for g in sizes):
        ap.error("--scenes must be >= 1, --samples >= 2, and every size in --sizes >= 2 and a divisor of --samples")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_backbone(args.backbone, model=args.model)
    model.eval()
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    pictures = [shapes.render(s) for s in scenes]
    greedy: list[str] = []
    with torch.no_grad():
        for i in range(0, len(pictures), 100):
            greedy += model.sample_text(pictures[i : i + 100], temperature=0.0).texts
    errors = [i for i, (s, t) in enumerate(zip(scenes, greedy)) if not right(s, t)]
    print(f"greedy errors: {len(errors)} of {len(scenes)}", flush=True)
    ctx = RewardContext(scorer=model, reference=model)
    gen = torch.Generator().manual_seed(1)
    totals = {g: Counter() for g in sizes}
    for n, i in enumerate(errors):
        with torch.no_grad():
            samples = model.sample_text([pictures[i]], num_samples=args.samples, temperature=1.0, generator=gen)
            rewards = dsr_consensus(ctx, samples).tolist()
        ok = [right(scenes[i], t) for t in samples.texts]
        is_greedy = [t == greedy[i] for t in samples.texts]
        for g in sizes:
            totals[g] += pair_kinds(rewards, ok, is_greedy, g)
        print(f"scene {n + 1}/{len(errors)}", flush=True)
    result = {
        "model": args.model,
        "scenes": args.scenes,
        "greedy_errors": len(errors),
        "samples": args.samples,
        "by_group_size": {
            str(g): {k: c[k] / max(c["groups"], 1) for k in ("greedy_in_group", *KINDS)} | {"groups": c["groups"]}
            for g, c in totals.items()
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for g, row in result["by_group_size"].items():
        print(f"G={g}: " + ", ".join(f"{k} {v:.0%}" for k, v in row.items() if k != "groups"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
