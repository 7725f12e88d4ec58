"""Does the label-free self-score pick the checkpoint the judge would? For a finished ShapesWorld run.

For each checkpoint of the run (``checkpoints/step-N/model``, and ``final/`` when the last step has no checkpoint)
this scores, on the same held-out items a run's self-evaluation uses (``suder.selfeval``):

- the judge: ShapesWorld's exact judge on ``--eval-num`` held-out prompts (text-to-image accuracy) and scenes
  (greedy caption accuracy), in percent, averaged over the run's trained directions;
- the self-score: ``selfeval/score`` against the run's base model (the frozen scorer), as a run logs it.

and writes JSON: per checkpoint both scores, then the label-free choice (the best self-score), the judge's best,
whether the label-free choice is within 1 judge point of the judge's best, the judge gain of the label-free choice
over the last checkpoint, and the Spearman rank correlation of the two scores over the checkpoints (average ranks
for ties; written out here, eight lines, rather than adding SciPy as a dependency for it).

    python benchmarks/selection.py RUN_DIR [--out selection.json] [--eval-num 400] [--selfeval-num 64]

A checkpoint every 50 steps (``--save-every 50``) of a 300-step run is 6 checkpoints; each costs one judged
evaluation and one self-evaluation (minutes on a GPU for Janus-Pro, seconds for the toy).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def ranks(values: list[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        r[v == x] = r[v == x].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's over average ranks); NaN with fewer than 2 points or a constant."""
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, model folder)`` of each complete checkpoint, and of ``final/`` at the run's last step when that step
    has none (a run's last step is saved as ``final/`` only)."""
    found = []
    for folder in sorted((run / "checkpoints").glob("step-*")):
        if (folder / "step.json").is_file():
            found.append((int(json.loads((folder / "step.json").read_text())["step"]), folder / "model"))
    info = json.loads((run / "run.json").read_text())
    last = int(info["steps"])
    sel = info.get("selfeval") or {}
    final_is_last = sel.get("final_step", last) == last
    if final_is_last and last not in {s for s, _ in found}:
        found.append((last, run / "final"))
    elif not final_is_last and (run / "last").is_dir() and last not in {s for s, _ in found}:
        found.append((last, run / "last"))
    return sorted(found)


def _load(cfg: Any, folder: Path) -> tuple[Any, Any]:
    """The model that draws and the model that captions of a saved folder (``gen/``, ``und/``: separate)."""
    from suder import load_backbone

    if (folder / "gen").is_dir():
        return (load_backbone(cfg.backbone, model=str(folder / "gen"), **cfg.backbone_options),
                load_backbone(cfg.backbone, model=str(folder / "und"), **cfg.backbone_options))
    model = load_backbone(cfg.backbone, model=str(folder), **cfg.backbone_options)
    return model, model


def judge(cfg: Any, gen_model: Any, und_model: Any, num: int) -> dict[str, float]:
    """The judge's accuracies (percent) and their mean over the run's trained directions."""
    from suder.evaluate import evaluate, headline

    out = {}
    if "gen" in cfg.directions:
        out["t2i"] = 100 * headline(evaluate(gen_model, num=num, what=("t2i",)))["t2i"]
    if "und" in cfg.directions:
        out["caption_greedy"] = 100 * headline(evaluate(und_model, num=num, what=("caption",)))["caption_greedy"]
    out["judge"] = sum(out.values()) / len(out)
    return out


def measure(run_dir: str | Path, eval_num: int = 400, selfeval_num: int | None = None) -> dict[str, Any]:
    """The JSON record of the module docstring, for the run in ``run_dir``."""
    from suder import load_backbone, selfeval
    from suder.config import resolve
    from suder.data import image_pool, prompt_pool

    run = Path(run_dir)
    extra = {"eval_every": 1, **({"selfeval_num": selfeval_num} if selfeval_num else {})}
    cfg = resolve(str(run / "config.yaml"), **extra)
    if not cfg.shapes_world:
        raise SystemExit(f"{run} is not a ShapesWorld run: the judge needs ShapesWorld's prompts and scenes.")
    pools = {}
    if "gen" in cfg.directions:
        pools["gen"] = prompt_pool(cfg.prompts, cfg.seed)
    if "und" in cfg.directions:
        pools["und"] = image_pool(cfg.images, cfg.seed)
    _, held = selfeval.heldout_split(cfg, pools)
    info = json.loads((run / "run.json").read_text())
    base = load_backbone(cfg.backbone, model=info["base_model"], **cfg.backbone_options).eval()
    base_summary = selfeval.summary(selfeval.self_evaluate(base, base, base, held, cfg))
    rows = []
    for step, folder in checkpoints(run):
        gen_model, und_model = _load(cfg, folder)
        now = selfeval.summary(selfeval.self_evaluate(gen_model, und_model, base, held, cfg))
        row = {"step": step, "model": str(folder), "self_score": selfeval.score(now, base_summary)}
        row |= {f"selfeval/{k}": v for k, v in now.items()} | judge(cfg, gen_model, und_model, eval_num)
        rows.append(row)
    if not rows:
        raise SystemExit(f"{run} has no checkpoints: run it with --save-every (e.g. 50).")
    chosen = max(rows, key=lambda r: (r["self_score"], -r["step"]))
    best = max(rows, key=lambda r: (r["judge"], -r["step"]))
    return {
        "run": str(run), "eval_num": eval_num, "selfeval_num": cfg.selfeval_num, "checkpoints": rows,
        "label_free_step": chosen["step"], "judge_best_step": best["step"],
        "within_1_point": best["judge"] - chosen["judge"] <= 1.0,
        "judge_of_label_free": chosen["judge"], "judge_of_best": best["judge"], "judge_of_last": rows[-1]["judge"],
        "judge_gain_label_free_vs_last": chosen["judge"] - rows[-1]["judge"],
        "spearman": spearman([r["self_score"] for r in rows], [r["judge"] for r in rows]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the --output-dir of a finished ShapesWorld run with checkpoints")
    p.add_argument("--out", help="JSON file to write (default: RUN/selection.json)")
    p.add_argument("--eval-num", type=int, default=400, help="held-out prompts and scenes the judge scores")
    p.add_argument("--selfeval-num", type=int, default=None, help="held-out items of the self-score (default: the "
                   "run's selfeval_num)")
    args = p.parse_args(argv)
    result = measure(args.run, args.eval_num, args.selfeval_num)
    out = Path(args.out or Path(args.run) / "selection.json")
    shown = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    out.write_text(json.dumps(shown, indent=2))
    sys.stdout.write(f"{out}: label-free step {result['label_free_step']}, judge's best {result['judge_best_step']}, "
                     f"within 1 point: {result['within_1_point']}, spearman {result['spearman']:.2f}\n")
    return result


if __name__ == "__main__":
    main()
