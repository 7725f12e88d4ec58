"""Drift monitors: the statistics that likelihood rewards let a model hack, against the frozen base's.

A likelihood reward can be raised without getting better: an image that is mostly one colour is easy to caption
with high confidence (an OCR reward blanked image backgrounds, dark-pixel fraction 0.45 -> 0.93), a caption that
repeats the likeliest words scores well under a captioner's own prior. None of this needs labels to see. At each
self-evaluation (``suder.selfeval``) the held-out images the model drew and the captions it wrote are summarised
(``image_stats``, ``caption_stats``) and compared with the same statistics of the frozen base's own samples for the
same held-out items (the baseline, the first evaluation); every training step also logs the share of groups whose
G samples are all identical (``identical_groups``), where the group comparisons that train the model are void.

Metrics (``drift/...``) and the thresholds at which a ``DriftWarning`` is given, once per monitor per run:

===========================  ===============================================  ==================================
metric                       what                                             warns when
===========================  ===============================================  ==================================
drift/brightness             mean luminance of the images, 0..1               |value - base| > 0.15
drift/saturation             mean HSV saturation, 0..1                         |value - base| > 0.15
drift/colour_entropy         entropy (bits) of the 64-colour histogram (4      value < base - 1.0
                             levels a channel) of each image, averaged
drift/uniform_images         share of near-uniform images (each channel's      value > base + 0.25
                             std over the pixels < 0.03)
drift/caption_words          mean words a caption                              value / base outside [0.5, 2]
drift/caption_vocab          distinct words over all the captions              value / base < 0.5
drift/gen_identical_groups   share of a step's gen groups whose G images are   mean of the last 20 steps
                             identical (training rollouts, every step)         > 0.5 and > base + 0.25, base:
                                                                              the mean of the run's first 20
drift/und_identical_groups   the same for the captions of an image             the same
===========================  ===============================================  ==================================

Each evaluation also logs ``drift/<name>_base`` (constant: the report shows it as one line). All of it is numpy on
the images already sampled: no model call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

UNIFORM_STD = 0.03  # the largest per-channel std over the pixels (0..1) below which an image is near-uniform


class DriftWarning(UserWarning):
    """A drift monitor crossed its threshold (``suder.monitors``); given once per monitor per run."""


def _abs(limit: float) -> Callable[[float, float], bool]:
    return lambda v, b: abs(v - b) > limit


THRESHOLDS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "brightness": (_abs(0.15), "moved more than 0.15 from the base's"),
    "saturation": (_abs(0.15), "moved more than 0.15 from the base's"),
    "colour_entropy": (lambda v, b: v < b - 1.0, "fell more than 1 bit below the base's"),
    "uniform_images": (lambda v, b: v > b + 0.25, "rose more than 0.25 above the base's"),
    "caption_words": (lambda v, b: b > 0 and not 0.5 <= v / b <= 2.0, "is outside half to twice the base's"),
    "caption_vocab": (lambda v, b: b > 0 and v / b < 0.5, "fell below half the base's"),
    # a confident base can start with many identical groups (the Emu3 plugin's captioner: 0.6): only a rise warns
    "gen_identical_groups": (lambda v, b: v > max(0.5, b + 0.25), "averaged over 20 steps is above 0.5 and 0.25 "
                             "above the run's first 20"),
    "und_identical_groups": (lambda v, b: v > max(0.5, b + 0.25), "averaged over 20 steps is above 0.5 and 0.25 "
                             "above the run's first 20"),
}
WHY = {
    "brightness": "images drifting to dark or light backgrounds",
    "saturation": "images losing or gaining colour",
    "colour_entropy": "images with fewer colours (blank or flat regions)",
    "uniform_images": "near-blank images",
    "caption_words": "captions growing or shrinking",
    "caption_vocab": "captions repeating the same words",
    "gen_identical_groups": "a group's images all the same, so the group comparisons that train it are void",
    "und_identical_groups": "an image's captions all the same, so the group comparisons that train it are void",
}


def image_stats(images: list[Any]) -> dict[str, float]:
    """``brightness``, ``saturation``, ``colour_entropy`` (bits) and ``uniform_images`` of PIL images."""
    if not images:
        return {}
    bright, sat, ent, uniform = [], [], [], []
    for im in images:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
        lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        bright.append(float(lum.mean()))
        hi, lo = rgb.max(-1), rgb.min(-1)
        sat.append(float(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-8), 0.0).mean()))
        q = np.minimum((rgb * 4).astype(np.int64), 3)  # 4 levels a channel: 64 colours
        counts = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
        p = counts[counts > 0] / counts.sum()
        ent.append(float(-(p * np.log2(p)).sum()))
        uniform.append(float(rgb.reshape(-1, 3).std(0).max() < UNIFORM_STD))
    return {"brightness": float(np.mean(bright)), "saturation": float(np.mean(sat)),
            "colour_entropy": float(np.mean(ent)), "uniform_images": float(np.mean(uniform))}


def caption_stats(captions: list[str]) -> dict[str, float]:
    """``caption_words`` (mean words a caption) and ``caption_vocab`` (distinct lower-cased words)."""
    if not captions:
        return {}
    words = [c.lower().split() for c in captions]
    return {"caption_words": float(np.mean([len(w) for w in words])),
            "caption_vocab": float(len({x for w in words for x in w}))}


def sample_stats(scores: dict[str, Any]) -> dict[str, float]:
    """The image and caption statistics of a ``selfeval.self_evaluate`` result (its ``images`` and ``captions``)."""
    return image_stats(scores.get("images", [])) | caption_stats(scores.get("captions", []))


def identical_groups(direction: str, samples: Any, group: int) -> float:
    """Share of the groups of ``samples`` (input-major, ``group`` rows each) whose rows are all identical: the
    image tokens (gen) or the caption texts (und)."""
    n = len(samples) // group
    if n == 0:
        return float("nan")
    same = 0
    for g in range(n):
        rows = slice(g * group, (g + 1) * group)
        if direction == "gen":
            tokens = samples.tokens[rows]
            same += bool((tokens == tokens[:1]).all())
        else:
            same += len(set(samples.texts[rows])) == 1
    return same / n


def drift_metrics(stats: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``drift/<name>`` and ``drift/<name>_base`` for each statistic of ``stats``."""
    out = {}
    for k, v in stats.items():
        out[f"drift/{k}"] = v
        if k in base:
            out[f"drift/{k}_base"] = base[k]
    return out


IDENTICAL_WINDOW = 20  # steps averaged for the identical-groups monitors (a step has only a few groups)


def check_identical(rows: list[dict[str, Any]], warned: list[str], step: int) -> list[str]:
    """The identical-groups monitors over a run's step metrics so far (``rows``, oldest first): the mean of the
    last ``IDENTICAL_WINDOW`` steps against the mean of the first ones (the base's own samples at the start; a
    confident base can start high), once there are two windows."""
    if len(rows) < 2 * IDENTICAL_WINDOW:
        return []
    now, base = {}, {}
    for name in ("gen_identical_groups", "und_identical_groups"):
        key = f"drift/{name}"
        first = [r[key] for r in rows[:IDENTICAL_WINDOW] if key in r]
        last = [r[key] for r in rows[-IDENTICAL_WINDOW:] if key in r]
        if first and last:
            now[key], base[name] = float(np.mean(last)), float(np.mean(first))
    return check(now, base, warned, step)


def check(metrics: dict[str, Any], base: dict[str, float], warned: list[str], step: int) -> list[str]:
    """Warn (``DriftWarning``) about each monitor of ``metrics`` that crossed its threshold and was not warned
    about yet (``warned``, updated in place); returns the names warned about now."""
    now = []
    for name, (crossed, what) in THRESHOLDS.items():
        value = metrics.get(f"drift/{name}")
        if name in warned or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        ref = base.get(name, 0.0)
        if crossed(float(value), float(ref)):
            warned.append(name)
            now.append(name)
            shown = f"{value:.3g}" + (f" (base {ref:.3g})" if name in base else "")
            warnings.warn(
                f"drift/{name} {what} at step {step}: {shown}, a sign of {WHY[name]}; look at the samples and the "
                "self-evaluation, and consider select_final best or a guard (docs/monitoring.md).",
                DriftWarning,
                stacklevel=2,
            )
    return now
