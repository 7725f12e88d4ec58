"""Label-free held-out self-evaluation: which checkpoint to keep and when to stop, without a judge.

**The held-out slice** (``heldout_split``). On a user's own data a fraction ``heldout`` of the distinct prompts
and of the image files (or the files ``heldout_prompts`` / ``heldout_images``) is set aside before the training
pools are built; a training prompt equal to a held-out one, or a training image with the same bytes as a held-out
one, is dropped from training too, so nothing held out is ever trained on. The fraction is drawn with a fixed seed
(``SPLIT_SEED``), not the run's: runs of different seeds hold out the same slice and their scores compare. On the
embedded ShapesWorld default the slice is the world's own: prompts and scenes drawn with ``SELF_EVAL_SEED`` that are
not in the run's training pools (the judge's evaluation keeps running beside it, as before).

**The self-score** (``self_evaluate``), every ``eval_every`` steps on ``selfeval_num`` held-out items, with fixed
seeds (the same images and captions for the same weights):

- gen: one image per held-out prompt from the model that draws; scored by the frozen base's
  r = reduce_t log p_base(prompt_t | image) (SUDER eq. 3, the ``dsr`` reward, ``reward_reduction``);
- und: the greedy caption of each held-out image from the model that captions; scored by the frozen base's
  dual-consensus reward r = sum_t log p_base(image_t | caption) + lambda * sum_t log p_base(caption_t | image)
  (``rewards.dsr_consensus``, ``consensus_lambda``);
- the same with the trained model as the scorer (``selfeval/{gen,und}_policy``) and the difference
  (``selfeval/{gen,und}_gap``): how much more the policy believes in its own samples than the frozen base does.
  A growing gap while the frozen score falls is the signature of a model that rewards itself for drifting.

**One number** (``selfeval/score``): for each trained direction the frozen score's gain over the base's own samples
(the first evaluation, ``baseline``) in units of the base's spread over the held-out items, averaged over the
directions: 0 at the base, +1 = one base standard deviation better. Directions in nats of different scales
(a per-token mean, a sum over hundreds of tokens) become comparable this way, and ``guard_drop`` is in these units.

**Selection and guard** (``Tracker``): the best score so far and its step; ``select_final: best`` keeps that step's
weights as ``final/`` (``RunWriter.save_best``); ``guard_drop`` stops the run, or rolls back to the best weights with
the learning rate times ``guard_lr_factor`` (``MAX_ROLLBACKS`` times, then stops), when the score falls that far
below its best. docs/monitoring.md has the trade-off.

Everything here is computed on one process (the trainer's ``decide``), with no collectives, and the result is
given to every process, so every rank logs and decides the same.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import monitors
from .data import Pool, check_images, list_images, load_image, read_prompts
from .errors import DataError

if TYPE_CHECKING:
    from .config import TrainConfig

SPLIT_SEED = 20261207  # the held-out fraction of a user's data: the same slice whatever the run's seed
SELF_EVAL_SEED = 4243  # ShapesWorld's held-out prompts and scenes, and the self-evaluation's sampling
MAX_ROLLBACKS = 3  # guard_action rollback: after this many, the next fall stops the run
BATCH = 16  # rows per sampling or scoring call


# ------------------------------------------------------------------------------------------- the slice
@dataclass
class HeldOut:
    """The held-out items: prompts (gen) and images (und; PIL images, loaded on use from ``load``)."""

    prompts: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    load: Any = None

    def pictures(self) -> list[Any]:
        return [self.load(x) if self.load else x for x in self.images]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pick(items: list[Any], fraction: float) -> set[Any]:
    """``round(fraction * len(items))`` items (at least 1), drawn with ``SPLIT_SEED``."""
    k = max(1, round(fraction * len(items)))
    return set(random.Random(SPLIT_SEED).sample(items, min(k, len(items))))


def _user_prompts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    texts = [r["prompt"] for r in read_prompts(cfg.prompts)]
    if cfg.heldout_prompts:
        held = list(dict.fromkeys(r["prompt"] for r in read_prompts(cfg.heldout_prompts)))
    elif cfg.heldout > 0:
        unique = list(dict.fromkeys(texts))
        chosen = _pick(unique, cfg.heldout)
        held = [t for t in unique if t in chosen]
    else:
        return texts, []
    excluded = set(held)
    train = [t for t in texts if t not in excluded]
    if not train:
        raise DataError(f"Every prompt of '{cfg.prompts}' is held out; lower --heldout or hold out fewer prompts.")
    return train, held


def _user_images(cfg: TrainConfig) -> tuple[list[Path], list[Path]]:
    files = list_images(cfg.images)
    if cfg.heldout_images:
        held = list_images(cfg.heldout_images)
    elif cfg.heldout > 0:
        chosen = _pick(files, cfg.heldout)
        held = [f for f in files if f in chosen]
    else:
        return files, []
    excluded = {_digest(f) for f in held}
    train = [f for f in files if f not in held and _digest(f) not in excluded]
    if not train:
        raise DataError(f"Every image of '{cfg.images}' is held out; lower --heldout or hold out fewer images.")
    check_images(held)
    return train, held


def heldout_split(cfg: TrainConfig, pools: dict[str, Pool]) -> tuple[dict[str, Pool], HeldOut | None]:
    """The training pools with the held-out slice removed, and the slice (``None``: no self-evaluation, when
    ``eval_every`` or ``selfeval_num`` is 0). ``pools``: the pools the run would train on without a slice
    (``data.prompt_pool`` / ``image_pool``)."""
    on = bool(cfg.eval_every and cfg.selfeval_num)
    if cfg.shapes_world:
        return pools, _shapes_heldout(cfg, pools) if on else None
    if not (cfg.heldout > 0 or cfg.heldout_prompts or cfg.heldout_images):
        return pools, None
    # removed whether or not this run evaluates: a resumed run that turns eval_every on trains on the same data
    out, held = dict(pools), HeldOut(load=load_image)
    if "gen" in pools:
        train, held.prompts = _user_prompts(cfg)
        out["gen"] = Pool(train, cfg.seed)
    if "und" in pools:
        train_files, held.images = _user_images(cfg)
        out["und"] = Pool(train_files, cfg.seed, load=load_image)
    return out, held if on else None


def _shapes_heldout(cfg: TrainConfig, pools: dict[str, Pool]) -> HeldOut:
    """ShapesWorld's held-out prompts and scenes: drawn with ``SELF_EVAL_SEED``, none in the training pools."""
    from .worlds import shapes

    n = cfg.selfeval_num
    held = HeldOut(load=shapes.render)
    if "gen" in pools:
        seen = set(pools["gen"].items)
        fresh = [p for p in dict.fromkeys(shapes.sample_prompts(20 * n, seed=SELF_EVAL_SEED)) if p not in seen]
        held.prompts = fresh[:n]
    if "und" in pools:
        seen = set(pools["und"].items)
        fresh = [s for s in dict.fromkeys(shapes.sample_scenes(20 * n, seed=SELF_EVAL_SEED)) if s not in seen]
        held.images = fresh[:n]
    return held


# ------------------------------------------------------------------------------------------- scoring
def _reduce(lp: Any, reduction: str) -> torch.Tensor:
    return (lp.sum() if reduction == "sum" else lp.mean()).float().cpu()


@torch.no_grad()
def self_evaluate(gen_model: Any, und_model: Any, frozen: Any, held: HeldOut, cfg: TrainConfig) -> dict[str, Any]:
    """Score ``selfeval_num`` held-out items (module docstring): ``{"gen_frozen": (n,), "gen_policy": (n,),
    "images": [...], "und_frozen": (m,), "und_policy": (m,), "captions": [...]}`` (tensors on the CPU), for the
    directions that have held-out items. ``gen_model`` draws, ``und_model`` captions, ``frozen`` is the frozen base
    (``engine.Reference``); for the base's own evaluation all three are the frozen base."""
    n = cfg.selfeval_num
    out: dict[str, Any] = {}
    models = {id(m): m for m in (gen_model, und_model) if isinstance(m, torch.nn.Module)}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        if held.prompts:
            gen = torch.Generator().manual_seed(SELF_EVAL_SEED)
            prompts, images, fro, pol = held.prompts[:n], [], [], []
            for i in range(0, len(prompts), BATCH):
                part = prompts[i : i + BATCH]
                samples = gen_model.sample_image(part, generator=gen)
                fro.append(_reduce(frozen.logp_text_given_image(part, samples), cfg.reward_reduction))
                own = fro[-1] if gen_model is frozen else _reduce(
                    gen_model.logp_text_given_image(part, samples), cfg.reward_reduction)
                pol.append(own)
                images += samples.images
            out |= {"gen_frozen": torch.cat(fro), "gen_policy": torch.cat(pol), "images": images}
        if held.images:
            gen = torch.Generator().manual_seed(SELF_EVAL_SEED + 1)
            pictures, captions, fro, pol = held.pictures()[:n], [], [], []
            for i in range(0, len(pictures), BATCH):
                part = pictures[i : i + BATCH]
                caps = und_model.sample_text(part, generator=gen, temperature=0.0)
                fro.append(consensus(frozen, caps, part, cfg.consensus_lambda))
                pol.append(fro[-1] if und_model is frozen else consensus(und_model, caps, part, cfg.consensus_lambda))
                captions += list(caps.texts)
            out |= {"und_frozen": torch.cat(fro), "und_policy": torch.cat(pol), "captions": captions}
    finally:
        for k, m in models.items():
            m.train(modes[k])
    return out


def consensus(scorer: Any, caps: Any, pictures: list[Any], lam: float) -> torch.Tensor:
    """``rewards.dsr_consensus`` with ``scorer`` for both terms: sum_t log p(image_t | c) + lam * sum_t
    log p(c_t | image); (B,)."""
    image_term = scorer.logp_image_given_text(pictures, caps, policy="cond").sum()
    caption_term = scorer.logp_text_given_image(caps, pictures).sum()
    return (image_term + lam * caption_term).float().cpu()


def summary(scores: dict[str, Any]) -> dict[str, float]:
    """Means of a ``self_evaluate`` result: ``{gen,und}_{frozen,policy,gap}``, and ``{gen,und}_std`` (the spread of
    the frozen scores over the held-out items, which the baseline's ``selfeval/score`` divides by)."""
    out: dict[str, float] = {}
    for d in ("gen", "und"):
        if f"{d}_frozen" not in scores:
            continue
        fro, pol = scores[f"{d}_frozen"], scores[f"{d}_policy"]
        out[f"{d}_frozen"], out[f"{d}_policy"] = float(fro.mean()), float(pol.mean())
        out[f"{d}_gap"] = out[f"{d}_policy"] - out[f"{d}_frozen"]
        out[f"{d}_std"] = float(fro.std(unbiased=False)) if fro.numel() > 1 else 0.0
    return out


def score(now: dict[str, float], base: dict[str, float]) -> float:
    """``selfeval/score``: the mean over directions of (frozen score - the base's) / the base's spread."""
    parts = []
    for d in ("gen", "und"):
        if f"{d}_frozen" in now and f"{d}_frozen" in base:
            spread = max(base.get(f"{d}_std", 0.0), 1e-6 * max(1.0, abs(base[f"{d}_frozen"])))
            parts.append((now[f"{d}_frozen"] - base[f"{d}_frozen"]) / spread)
    return sum(parts) / len(parts) if parts else float("nan")


def base_record(frozen: Any, held: HeldOut, cfg: TrainConfig) -> dict[str, Any]:
    """The frozen base's own held-out evaluation (``selfeval.json``): its summary, which ``score`` measures gains
    against, its samples' statistics, which the drift monitors compare with, and the held-out sizes."""
    scores = self_evaluate(frozen, frozen, frozen, held, cfg)
    return {
        "summary": summary(scores),
        "drift": monitors.sample_stats(scores),
        "heldout": {"prompts": len(scores.get("gen_frozen", [])), "images": len(scores.get("und_frozen", []))},
    }


def evaluate_step(gen_model: Any, und_model: Any, frozen: Any, held: HeldOut, cfg: TrainConfig,
                  base: dict[str, Any], tracker: Tracker, step: int) -> tuple[dict[str, float], str]:
    """The held-out self-evaluation at ``step``: its metrics (``selfeval/...``, ``drift/...``, a drift warning
    at most once each) and what ``tracker`` says to do (``Tracker.observe``)."""
    scores = self_evaluate(gen_model, und_model, frozen, held, cfg)
    now = summary(scores)
    value = score(now, base["summary"])
    action = tracker.observe(value, step)
    out = {f"selfeval/{k}": v for k, v in now.items() if not k.endswith("_std")}
    out |= {"selfeval/score": value, "selfeval/best_score": tracker.best_score, "selfeval/best_step": tracker.best_step}
    out |= monitors.drift_metrics(monitors.sample_stats(scores), base["drift"])
    monitors.check(out, base["drift"], tracker.warned, step)
    return out, action


def run_record(cfg: TrainConfig, tracker: Tracker, base: dict[str, Any] | None, out: Path, final: Path,
               last_step: int, select_best: bool) -> dict[str, Any]:
    """``run.json``'s ``selfeval``: the base's scores, the tracker's state and which step ``final/`` holds."""
    chosen = tracker.best_step if select_best and (final / "selfeval.json").is_file() else last_step
    return {
        "select_final": cfg.select_final, "final_step": chosen, "last_step": last_step,
        "last_model": str(out / "last") if (out / "last").is_dir() else str(final),
        "base": (base or {}).get("summary"), "heldout": (base or {}).get("heldout"), **tracker.state(),
    }


# ------------------------------------------------------------------------------------------- selection
@dataclass
class Tracker:
    """The best self-score so far and what the guard did; plain data, saved in each checkpoint's ``step.json``.

    ``observe`` returns what to do: ``improved`` (a new best: keep these weights), ``hold``, ``stop`` or ``rollback``.
    """

    guard_drop: float | None = None
    guard_action: str = "stop"
    best_score: float | None = None
    best_step: int | None = None
    last_score: float | None = None
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    stopped_at: int | None = None
    warned: list[str] = field(default_factory=list)

    def observe(self, value: float, step: int) -> str:
        self.last_score = value
        if not math.isfinite(value):
            return "hold"
        if self.best_score is None or value > self.best_score:
            self.best_score, self.best_step = value, step
            return "improved"
        if self.guard_drop is not None and self.best_score - value > self.guard_drop:
            if self.guard_action == "rollback" and len(self.rollbacks) < MAX_ROLLBACKS:
                self.rollbacks.append({"step": step, "score": value, "to_step": self.best_step})
                return "rollback"
            self.stopped_at = step
            return "stop"
        return "hold"

    def state(self) -> dict[str, Any]:
        keys = ("best_score", "best_step", "last_score", "rollbacks", "stopped_at", "warned")
        return {k: getattr(self, k) for k in keys}

    def load(self, state: dict[str, Any] | None, best_marker: dict[str, Any] | None = None) -> None:
        """Restore ``state`` (a checkpoint's); ``best_marker``: ``best/selfeval.json``, the weights kept on disk,
        which win when they score higher (a best found after the checkpoint, before a crash: the resumed run
        reaches the same weights again and need not save them twice)."""
        for k, v in (state or {}).items():
            if hasattr(self, k):
                setattr(self, k, v)
        if best_marker and (self.best_score is None or best_marker["score"] > self.best_score):
            self.best_score, self.best_step = best_marker["score"], best_marker["step"]
