"""Pieces every backbone's samplers share: padding and the KV-cached caption loop (public: plugins may use them).

Used by every built-in caption sampler (toy, janus-pro, show-o) and by the emu3 plugin; the toy and emu3 also pad
with ``left_pad`` / ``right_pad``. Each backbone keeps what differs between models (its forward, its restricted
vocabulary, its ``draw``, whose random-number use fixes what a seed samples); what is the same everywhere lives here
once. The conformance kit (``suder.testing``) checks that the backbones using them mean the same thing by them:
right-padded captions whose ``.logps`` are the teacher-forced ones, left-padded prompts that score as they do alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Draw = Callable[[torch.Tensor, float, "torch.Generator | None"], tuple[torch.Tensor, torch.Tensor]]


def left_pad(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts, right-aligned: ids (B, L) long with ``pad`` on the left and mask (B, L) long (1 at real tokens).
    Pair with position ids ``(mask.cumsum(-1) - 1).clamp_min(0)`` so that padding does not move a row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (captions), left-aligned: tokens (B, T) long with ``pad`` on the right and mask (B, T) bool."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return tokens.to(device), mask.to(device)


def caption_loop(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    draw: Draw,
    *,
    limit: int,
    eos: int,
    pad: int,
    temperature: float,
    generator: torch.Generator | None,
    token_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``limit`` tokens per row, each row stopping after ``eos``.

    ``logits``: (n, V) float logits of the first token (after the caption prompt). ``step(token)`` feeds the
    (n, 1) tokens just drawn through the model (KV-cached) and returns the next (n, V) logits. ``draw(logits,
    temperature, generator)`` returns (choice (n,), its log-prob (n,)); ``token_of`` maps a choice to a token id
    when the logits cover a restricted vocabulary. The loop only hands ``logits`` from ``step`` to ``draw``, so
    they may be any (n, ...) tensor ``draw`` reads (Show-o passes hidden states and projects them in ``draw``).
    Returns ``tokens`` (n, limit) long (``pad`` after the end), ``logps`` (n, limit) float (0 there) and ``alive``
    (n, limit) bool (True at sampled tokens, ``eos`` included).
    """
    n, device = logits.shape[0], logits.device
    tokens = torch.full((n, limit), pad, dtype=torch.long, device=device)
    logps = torch.zeros(n, limit, device=device)
    alive = torch.zeros(n, limit, dtype=torch.bool, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(limit):
        choice, logp = draw(logits, temperature, generator)
        token = choice if token_of is None else token_of(choice)
        alive[:, t] = ~done
        tokens[:, t] = torch.where(done, pad, token)
        logps[:, t] = torch.where(done, 0.0, logp)
        done = done | (token == eos)
        if bool(done.all()) or t + 1 == limit:
            break
        logits = step(tokens[:, t : t + 1])
    return tokens, logps, alive
