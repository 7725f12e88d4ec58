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

Generators = "torch.Generator | Sequence[torch.Generator] | None"
"""What a sampler's ``generator=`` accepts: one generator for the whole call, or one per output row (``B*G``,
input-major), each row then drawn from its own stream exactly as if it were sampled alone with it. Per-row
streams make a sample independent of how many others share its call, which is what lets the trainer split a
group into chunks (``suder.rollout.Chunks``) with the same results; backbones that accept them say so with a
class attribute ``row_generators = True``."""

Draw = Callable[[torch.Tensor, float, "torch.Generator | Sequence[torch.Generator] | None"],
                tuple[torch.Tensor, torch.Tensor]]


def is_per_row(generator: object) -> bool:
    """Whether ``generator`` is a sequence of per-row generators (``Generators``)."""
    return isinstance(generator, (list, tuple))


def rows_of(generator: object, start: int, stop: int) -> object:
    """The generator(s) of rows ``[start, stop)``: a slice of per-row generators, else ``generator`` itself."""
    return list(generator[start:stop]) if is_per_row(generator) else generator


def _blocks(generator: Sequence[torch.Generator], rows: int) -> int:
    """Rows per generator: each generator owns an equal block of consecutive rows (Show-o draws N per image)."""
    count = len(generator)
    assert count and rows % count == 0, f"{count} per-row generators for {rows} rows"
    return rows // count


def rand_rows(shape: tuple[int, ...], generator: object, device: torch.device | str) -> torch.Tensor:
    """``torch.rand(shape)`` (float32 on ``device``) drawn on the generator's device; with per-row generators
    row block ``i`` of dim 0 is ``torch.rand`` of that block's shape from generator ``i`` (as if drawn alone)."""
    if not is_per_row(generator):
        where = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=where).to(device)
    size = _blocks(generator, shape[0])
    parts = [torch.rand((size, *shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.cat(parts).to(device)


def multinomial_rows(probs: torch.Tensor, generator: object) -> torch.Tensor:
    """One draw per row of (R, K) probabilities -> (R, 1) long, on the generator's device; with per-row
    generators each generator draws for its block of rows alone, as one call on that block would."""
    def one(p: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        if g is not None and g.device != p.device:
            return torch.multinomial(p.to(g.device), 1, generator=g).to(p.device)
        return torch.multinomial(p, 1, generator=g)

    if not is_per_row(generator):
        return one(probs, generator)
    size = _blocks(generator, probs.shape[0])
    return torch.cat([one(probs[i * size : (i + 1) * size], g) for i, g in enumerate(generator)])


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
    generator: torch.Generator | Sequence[torch.Generator] | None,
    token_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``limit`` tokens per row, each row stopping after ``eos``.

    ``logits``: (n, V) float logits of the first token (after the caption prompt). ``step(token)`` feeds the
    (n, 1) tokens just drawn through the model (KV-cached) and returns the next (n, V) logits. ``draw(logits,
    temperature, generator)`` returns (choice (n,), its log-prob (n,)); ``token_of`` maps a choice to a token id
    when the logits cover a restricted vocabulary. The loop only hands ``logits`` from ``step`` to ``draw``, so
    they may be any (n, ...) tensor ``draw`` reads (Show-o passes hidden states and projects them in ``draw``).
    ``generator`` is handed to ``draw`` as given (one, or one per row: ``Generators``).
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
