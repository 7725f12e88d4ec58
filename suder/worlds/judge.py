"""The ShapesWorld judge over sampled groups: 1.0 where a sample is right, else 0.0, one value per sample.

The exact judge is ``shapes.satisfies`` (spec, "Matching rules"); these two apply it to the protocol's sample
records (``ImageSamples`` / ``TextSamples``, by their fields) so the ``shapes-judge`` reward, the trainer's
judge monitor and evaluation read the same verdicts. External supervision, for comparison only: the dual
self-rewards never see it.
"""

from __future__ import annotations

from typing import Any

import torch

from . import shapes


def judge_generation(samples: Any) -> torch.Tensor:
    """1.0 where the judge finds the image satisfies its prompt: ``samples.images`` / ``samples.prompts``
    (an ``ImageSamples``) -> (B*G,) float32."""
    hits = [shapes.satisfies(shapes.parse_image(im), p) for im, p in zip(samples.images, samples.prompts)]
    return torch.tensor(hits, dtype=torch.float32)


def judge_understanding(samples: Any) -> torch.Tensor:
    """1.0 where the caption is true of the image it describes: ``samples.images`` / ``samples.texts`` (a
    ``TextSamples``) -> (B*G,) float32."""
    hits = [shapes.satisfies(shapes.parse_image(im), c) for im, c in zip(samples.images, samples.texts)]
    return torch.tensor(hits, dtype=torch.float32)
