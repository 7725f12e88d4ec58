"""Show-o's samplers: MaskGIT for images, autoregressive draws for text (pure functions over logits).

References: Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer" (arXiv:2202.04200) section 3.2
(iterative decoding, eq. 4 mask schedule); Chang et al. 2023, "Muse" (arXiv:2301.00704) section 2.6 for the
guidance form; Show-o's ``t2i_generate`` (showlab/Show-o, ``models/modeling_showo.py`` and ``models/sampling.py``).

Show-o's sampler departs from the MaskGIT paper, and we keep Show-o's choices so a seed gives Show-o's images:

- guidance is ``(1 + g) cond - g uncond`` on the logits (``g = 0``: none), cond and uncond rows in one batch;
- the token distribution is *not* tempered: ``temperature`` only scales the Gumbel noise that picks which
  tokens to re-mask, and it compounds: ``t_k = t_0 prod_{j <= k} (1 - (j + 1) / T)`` (MaskGIT uses
  ``t_0 (1 - (k + 1) / T)``);
- per step and in this order: one multinomial draw over the B*N rows, then one ``uniform_`` of shape (B, N).

``temperature == 0`` is greedy (suder's contract for every backbone, not an option of Show-o's sampler): each step
takes the arg-max code at every masked position and re-masks the least confident ones with no Gumbel noise, so
no random number is drawn and the generator is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ...sampling import is_per_row, multinomial_rows


def mask_schedule(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """ratio in [0, 1] -> fraction still masked: ``cosine`` cos(r pi/2), ``linear`` 1 - r, ``pow<k>`` 1 -
    r^k."""
    if name == "cosine":
        return lambda r: torch.cos(r * math.pi / 2)
    if name == "linear":
        return lambda r: (1 - r).clamp(1e-6, 1.0)
    if name.startswith("pow"):
        try:
            k = float(name[3:])
        except ValueError:
            k = None
        if k is not None:
            return lambda r: (1 - r**k).clamp(1e-6, 1.0)
    raise ValueError(f"Unknown mask schedule {name!r}; use cosine, linear or pow<k> (e.g. pow2).")


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Show-o's (MUSE-style) classifier-free guidance on logits: (1 + g) cond - g uncond."""
    return (1 + scale) * cond - scale * uncond


def _uniform(shape: tuple[int, ...], generator: Any, device: torch.device) -> torch.Tensor:
    """Uniform numbers of ``shape`` (B, ...), on the generator's device; per-row generators (one per image,
    ``suder.sampling.Generators``) each fill their own row, as a call with that image alone would."""
    if is_per_row(generator):
        assert len(generator) == shape[0], f"{len(generator)} per-row generators for {shape[0]} rows"
        return torch.cat([_uniform((1, *shape[1:]), g, device) for g in generator])
    where = generator.device if generator is not None else device
    return torch.zeros(shape, device=where).uniform_(0, 1, generator=generator).to(device)


def _multinomial(probs: torch.Tensor, generator: Any) -> torch.Tensor:
    """One draw per row of (R, K) probabilities, on the generator's device (per-row generators: each draws
    its own block of rows, an image's N positions or a caption's row)."""
    return multinomial_rows(probs, generator)


def mask_by_random_topk(
    mask_len: torch.Tensor, probs: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, N) bool: re-mask the positions whose Gumbel-perturbed log-confidence is below the ``mask_len``-th
    smallest. ``mask_len`` (B, 1) long, ``probs`` (B, N) confidence of the sampled tokens."""
    confidence = torch.log(probs.clamp_min(1e-20))
    if temperature != 0:  # greedy sampling draws no noise at all (module docstring)
        u = _uniform(tuple(probs.shape), generator, probs.device)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
        confidence = confidence + temperature * gumbel
    cut_off = confidence.sort(-1).values.gather(-1, mask_len.long())
    return confidence < cut_off


@torch.no_grad()
def maskgit_sample(
    image_logits: Callable[[torch.Tensor], torch.Tensor],
    codes: torch.Tensor,
    *,
    steps: int = 18,
    temperature: float = 1.0,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Iterative parallel decoding of (B, N) image codes (``-1`` = masked; others are kept, e.g. inpainting).

    ``image_logits(codes)`` returns (B, N, K) float logits over the K image codes for the current codes
    (masked positions still ``-1``), guidance already applied. Returns (B, N) codes in [0, K), all positions
    filled. ``temperature``: 0 is greedy (arg-max codes, noise-free re-masking); otherwise it scales the
    re-masking noise only, as in Show-o.
    """
    b, n = codes.shape
    greedy = temperature == 0
    current = codes.clone()
    fraction = mask_schedule(schedule)
    sampled = current
    for step in range(steps):
        probs = torch.softmax(image_logits(current).float(), -1)  # (B, N, K)
        k = probs.shape[-1]
        sampled = probs.argmax(-1) if greedy else _multinomial(probs.reshape(-1, k), generator).view(b, n)
        unknown = current < 0
        sampled = torch.where(unknown, sampled, current)
        ratio = (step + 1) / steps
        mask_ratio = fraction(torch.tensor(ratio, dtype=torch.float32))
        conf = probs.gather(-1, sampled[..., None]).squeeze(-1)
        conf = torch.where(unknown, conf, torch.finfo(torch.float32).max)
        mask_len = torch.floor(n * mask_ratio).long().to(conf.device).expand(b, 1)
        mask_len = torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len).clamp_min(1)
        temperature = temperature * (1 - ratio)  # compounds on purpose: Show-o's annealing (module docstring)
        remask = mask_by_random_topk(mask_len, conf, temperature, generator)
        current = torch.where(remask, torch.full_like(sampled, -1), sampled)
    return sampled.clamp(0, None)


def draw(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) float logits -> (index (B,), its log-prob under the sampling policy (B,)).

    ``temperature == 0`` is greedy and scores the untempered distribution.
    """
    if temperature == 0:
        choice = logits.argmax(-1)
        return choice, torch.log_softmax(logits, -1).gather(-1, choice[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    choice = _multinomial(logp.exp(), generator)
    return choice.squeeze(-1), logp.gather(-1, choice).squeeze(-1)
