"""Janus-Pro's image samplers and token draws, shared by the adapter (``modeling``) and ``benchmarks/rollout.py``.

Every sampler takes (model, prompt embeddings, mask) and returns (tokens, per-token log-probs under the sampling
policy); they are looked up by name (``IMAGE_SAMPLERS``): ``reference`` is the plain loop over transformers'
forward, ``fast`` (the default) gives the same tokens and log-probs for a seed on a pre-allocated cache, with CUDA
graphs on CUDA (``suder.fast_sampling``; measured in ``docs/performance.md``). Guidance is
``uncond + s * (cond - uncond)`` on raw logits (Ho & Salimans 2022, eq. 6), cond and uncond rows in one batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...sampling import rand_rows


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """One token per row of (R, V) float logits: (token (R,), its log-prob under the sampling policy (R,)).

    ``temperature == 0`` is greedy (log-prob at temperature 1). Sampling inverts the CDF with one uniform
    number per row from ``generator``, drawn on the generator's own device: a CPU generator (the trainer's)
    then drives a CUDA model moving R numbers instead of R x V probabilities; seeds hold on every device.
    ``generator`` may be one per row (``suder.sampling.Generators``).
    """
    if temperature == 0:
        return pick(logits, temperature, None)
    return pick(logits, temperature, rand_rows((logits.shape[0], 1), generator, logits.device))


def pick(logits: torch.Tensor, temperature: float, u: torch.Tensor | None):
    """``draw`` given its uniform numbers ``u`` (R, 1) (unused when greedy): no host sync, graph-capturable."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    cdf = logp.exp().cumsum(-1)
    u = u.to(cdf.device, cdf.dtype)
    # scaled by the total, u stays below the last nonzero mass: a zero-probability (suppressed) id never wins
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(logits.shape[-1] - 1)
    return token.squeeze(-1), logp.gather(-1, token).squeeze(-1)


def image_logits(model: nn.Module, hidden: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """Generation-head logits in float32, guided when ``guidance_scale`` is set: (R, ..., H) -> (R', ..., V).

    With guidance the rows are ``[cond; uncond]``; the result, ``uncond + s * (cond - uncond)``, has half.
    """
    logits = model.model.generation_head(hidden).float()
    if guidance_scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def sample_image_tokens(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, *, num_tokens: int,
                        guidance_scale: float | None, temperature: float, generator: torch.Generator | None):
    """The reference image sampler: ``DynamicCache``, one prefill, then ``num_tokens`` single-token steps.

    ``embeds``: (R, L, H) prompt embeddings, R = 2n rows ``[cond; uncond]`` when guided, else n; ``mask``:
    (R, L). Returns (tokens (n, N) long, logps (n, N) float32); all ``num_tokens`` codes are always drawn (an
    image has no end token). Samplers share this signature, so a faster one (static cache, compile) can be
    swapped in by name (``IMAGE_SAMPLERS``) and compared token for token with this one.
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    rows = embeds.shape[0]
    n = rows // 2 if guidance_scale is not None else rows
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    position = positions[:, -1:]
    tokens = torch.empty(n, num_tokens, dtype=torch.long, device=embeds.device)
    logps = torch.empty(n, num_tokens, dtype=torch.float32, device=embeds.device)
    for t in range(num_tokens):
        token, logp = draw(image_logits(model, hidden, guidance_scale), temperature, generator)
        tokens[:, t], logps[:, t] = token, logp
        if t + 1 == num_tokens:
            break
        feed = token.repeat(rows // n)  # the same code continues the cond and the uncond row
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        position = position + 1
        step = model.prepare_embeddings_for_image_generation(feed)[:, None]
        out = lm(inputs_embeds=step, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
    return tokens, logps


def sample_image_tokens_fast(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, *, num_tokens: int,
                             guidance_scale: float | None, temperature: float,
                             generator: torch.Generator | None, loop: str = "auto", bucket: int = 64):
    """The fast image sampler: the reference loop's tokens and log-probs for the same generator (tested), on a
    pre-allocated cache with the per-step work hoisted out of the loop (``suder.fast_sampling``).

    Signature and returns as ``sample_image_tokens``. ``loop``: ``"auto"`` (CUDA graphs on CUDA, else eager),
    ``"eager"`` or ``"graphs"`` (on CPU: the graph protocol without capture, for tests); ``bucket``: cache
    slots per CUDA graph (attention reads up to a bucket's end, masked). Falls back to the
    reference loop for language models ``StaticDecoder`` cannot drive (``fast_sampling.supports``).
    """
    from ...fast_sampling import StaticDecoder, run_steps, supports, uniforms

    if loop not in ("auto", "eager", "graphs"):
        raise ValueError(f"loop must be 'auto', 'eager' or 'graphs', got {loop!r}")
    lm = model.model.language_model
    if not supports(lm):
        return sample_image_tokens(model, embeds, mask, num_tokens=num_tokens, guidance_scale=guidance_scale,
                                   temperature=temperature, generator=generator)
    device = embeds.device
    rows = embeds.shape[0]
    n = rows // 2 if guidance_scale is not None else rows
    decoder = StaticDecoder(lm, embeds, mask, num_tokens)
    u = uniforms(generator, num_tokens, n, device) if temperature != 0 else None
    tokens = torch.empty(n, num_tokens, dtype=torch.long, device=device)
    logps = torch.empty(n, num_tokens, dtype=torch.float32, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)  # the step, on the device (graph replays read it)

    def body(span: int, advance: bool) -> None:
        token, logp = pick(image_logits(model, decoder.hidden, guidance_scale), temperature,
                           None if u is None else u.index_select(0, t)[0])
        tokens.index_copy_(1, t, token[:, None])
        logps.index_copy_(1, t, logp[:, None])
        t.add_(1)
        if advance:
            feed = token.repeat(rows // n)  # the same code continues the cond and the uncond row
            decoder.step(model.prepare_embeddings_for_image_generation(feed)[:, None], span)

    graphs = loop == "graphs" or (loop == "auto" and device.type == "cuda")
    run_steps(body, num_tokens, decoder, graphs=graphs, state=[tokens, logps, t], bucket=bucket)
    return tokens, logps


IMAGE_SAMPLERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "fast": sample_image_tokens_fast,  # the default: the reference's tokens and log-probs, faster
    "fast-eager": functools.partial(sample_image_tokens_fast, loop="eager"),  # no CUDA graphs
    "reference": sample_image_tokens,  # a plain loop over transformers' forward with a DynamicCache
    "dynamic": sample_image_tokens,  # the reference's first name, kept for saved settings
}


def log_softmax_at(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at ``index``: (R, T, V), (R, T) -> (R, T), by TRL's memory-aware helper."""
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, index, temperature=temperature)


def scoring_temperature(options: dict[str, Any]) -> float:
    t = options.get("temperature", 1.0)
    return 1.0 if not t else float(t)  # greedy samples are scored at temperature 1, as ``draw`` records
