"""A ShapesWorld Janus-Pro base built as ``suder pretrain --backbone janus-pro`` builds it, but with the language
model's query and key projections drawn at another scale: the q/k bases of
research/notes/2026-12-03-janus-pro-captioner-binding.md. A diagnostic, not a recipe option (no base built so met
the targets there).

    HF_HUB_OFFLINE=1 python research/scripts/janus_qk_base.py --qk-init 0.1 --out BASE [--steps 3000]
    suder run --backbone janus-pro --model BASE --seed 0 --output-dir RUN   # the default's settings apply

The recipe's hyper-parameters (seed 2, 2000 steps, 32 + 16 pairs a step, lr 1e-3) unless given; the projections
are redrawn after the build (``janus_binding_probe.redraw_query_key``, seeded by ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qk-init", type=float, required=True, help="standard deviation (the recipe's: 0.02)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--seed", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--caption-batch-size", type=int, default=None, help="default: the recipe's")
    args = ap.parse_args()

    from janus_binding_probe import redraw_query_key

    from suder.backbones.janus_pro.shapes_world import build_shapes_base, recipe
    from suder.console import loss_info as _loss_info
from suder.console import progress as _progress
    from suder.data import ensure_writable_dir
    from suder.errors import SuderError
    from suder.pretrain import MARKER, pretrain, write_marker

    try:
        ensure_writable_dir(args.out, "--out folder", create=False)  # before minutes of work
    except SuderError as e:
        ap.error(str(e))
    start = time.perf_counter()

    rec = recipe()
    hp = dict(rec.pretrain)
    for key in ("steps", "seed", "caption_batch_size"):
        if getattr(args, key) is not None:
            hp[key] = getattr(args, key)
    with _progress() as bar:  # as `suder pretrain` shows it: the image tokenizer's steps, then the model's
        task = bar.add_task("pretrain", total=None, info="")

        def show(m: dict, phase: str) -> None:
            bar.update(task, total=m["total_steps"], completed=m["step"], info=_loss_info({"phase": phase, **m}))

        torch.manual_seed(hp["seed"])
        model = build_shapes_base(seed=hp["seed"], callback=lambda m: show(m, "tokenizer"))
        redraw_query_key(model, args.qk_init, hp["seed"])
        result = pretrain(model, out=args.out, callback=lambda m: show(m, "model"), **hp)
    info = json.loads((Path(args.out) / MARKER).read_text())
    write_marker(args.out, info | {"backbone": "janus-pro", "version": rec.version, "qk_init": args.qk_init})
    seconds = time.perf_counter() - start
    print(f"Saved to {args.out} ({seconds:.0f} s with the image tokenizer, final loss {result.losses[-1]:.4f})")


if __name__ == "__main__":
    main()
