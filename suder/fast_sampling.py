"""Fast KV-cached decoding for the autoregressive image samplers (``toy`` and ``janus-pro``).

Both backbones draw images with a Llama (transformers' ``LlamaModel``) one token at a time: 64 codes for the
toy, 576 for Janus-Pro, for every row of a group batch (doubled for classifier-free guidance). At the sizes we
sample, a decode step is dominated by per-call work rather than arithmetic: transformers rebuilds the attention
mask, grows the cache, computes the rotary angles and wraps outputs on every call, and the loop around it
concatenates the attention mask and draws one random number per step. ``StaticDecoder`` keeps what can be
computed once out of the loop:

- the prompt is prefilled by one transformers forward, once per distinct prompt row (a group's G samples share
  it), and its keys and values copied into buffers sized for the prompt plus every new token; the loop then
  writes each step's keys and values into those buffers in place (transformers' ``StaticCache`` through its
  own forward is slower than the reference loop on CPU: ``docs/performance.md``);
- the attention mask is an additive bias (``(R, 1, 1, S)``) built once: left pads of the prompt are masked,
  nothing is concatenated per step; attention reads only the filled part of the cache (``span``);
- the rotary cos/sin of every position come from one call of the model's own rotary embedding;
- sampling's uniform numbers are drawn before the loop (``uniforms``), in the order the reference loop draws
  them, so a seed gives the reference's tokens;
- on CUDA the whole step (head, draw, re-embed, decode) is captured once per cache-length bucket as a CUDA
  graph and replayed (``run_steps``): no Python and no kernel launches per step on the host.

What is hand-written is only the attention over the cache; norms, projections, MLPs, embeddings and heads are
the model's own modules, so a peft LoRA adapter (on or switched off) acts exactly as in the reference loop.
Departures from transformers' forward, each within float rounding (the tests compare tokens exactly and
log-probs to 1e-5 in float32 with the reference samplers):

- attention is the eager formula (``softmax(q k^T * scale + bias)`` in float32, then ``@ v``) for every
  ``attn_implementation``; grouped-query heads are handled by a reshape instead of ``repeat_kv``;
- ``rotate_half(x) * sin`` is computed as ``roll(x, D/2) * [-sin, sin]`` (the same products);
- the rotary table is computed for all positions at once (elementwise, the same values).

Unsupported language models (not a ``LlamaModel``, or dynamic RoPE scaling, whose angles depend on the call's
length) make ``supports`` false; the backbones then fall back to their reference loop.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn


def supports(lm: nn.Module) -> bool:
    """Whether ``StaticDecoder`` can drive ``lm`` (a transformers ``LlamaModel`` with static RoPE)."""
    from transformers import LlamaModel

    if not isinstance(lm, LlamaModel):
        return False
    rope = getattr(lm.rotary_emb, "rope_type", "default")
    return "dynamic" not in str(rope)


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of ``StaticDecoder``'s KV cache and attention products: float32 for a bfloat16 or float16
    model on CPU, else the model's own.

    On CPU a bfloat16 batched product of one query row with the cache runs 3-4x slower than the float32 one,
    and with the keys transposed and sliced (``q @ k[:span]^T``) it first copies the whole filled cache to
    contiguous memory, every layer of every step: the bfloat16 sampler took 3.3x its float32 time
    (``docs/performance.md``). The keys and values are the model's own (rounded to its dtype by its
    projections), only stored and multiplied in float32: the attention is a little more precise than the
    model's bfloat16 forward, not less. On CUDA reduced-precision products are fast and the cache stays small.
    """
    reduced = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if device.type == "cpu" and reduced else dtype


def uniforms(generator: torch.Generator | list[torch.Generator] | None, steps: int, rows: int,
             device: torch.device) -> torch.Tensor:
    """(steps, rows, 1) float32 on ``device``: the numbers ``steps`` successive calls of
    ``torch.rand((rows, 1), generator=generator, device=generator.device)`` would give, in that order.

    A CPU generator fills one tensor serially, element by element, so one call equals the successive calls
    (tested); other generators (CUDA's Philox advances by call) are drawn call by call, before the loop.
    ``generator`` may also be one generator per row (``suder.sampling.Generators``): column ``r`` is then
    ``uniforms(generator[r], steps, 1)``.
    """
    if isinstance(generator, (list, tuple)):  # one per row: each row's numbers as if it were drawn alone
        assert len(generator) == rows, f"{len(generator)} per-row generators for {rows} rows"
        return torch.cat([uniforms(g, steps, 1, device) for g in generator], 1)
    where = generator.device if generator is not None else device
    if where.type == "cpu":
        u = torch.rand((steps, rows, 1), generator=generator, device=where)
    else:
        u = torch.stack([torch.rand((rows, 1), generator=generator, device=where) for _ in range(steps)])
    return u.to(device, torch.float32)


def distinct_rows(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal adjacent rows (a group's G copies of one prompt): the first row of each run (U,) and each
    row's run (R,). Equal inputs give equal outputs, so prefilling one row per run loses nothing."""
    same = (embeds[1:] == embeds[:-1]).flatten(1).all(1) & (mask[1:] == mask[:-1]).all(1)
    start = torch.cat([same.new_ones(1), ~same])
    return start.nonzero().squeeze(1), start.cumsum(0) - 1


class StaticDecoder:
    """A Llama over a pre-allocated KV cache: built, it prefills the prompt; ``step`` feeds one token at a time.

    ``lm``: a transformers ``LlamaModel``; ``embeds``: (R, L, H) prompt embeddings, left-padded; ``mask``: (R, L)
    1 at real tokens; ``new_tokens``: how many tokens ``step`` will write (the cache holds L + new_tokens).
    Positions are ``cumsum(mask) - 1`` as everywhere in suder. Equal adjacent rows are prefilled once
    (``distinct_rows``). State lives in tensors updated in place (``hidden``, ``position``, ``slot``,
    ``bias``), so one ``step`` can be captured as a CUDA graph.
    """

    def __init__(self, lm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, new_tokens: int):
        from transformers import DynamicCache

        rows, length = mask.shape
        self.lm = lm
        self.prompt_length = length
        self.capacity = length + new_tokens
        first, inverse = distinct_rows(embeds, mask)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=lm.config)  # prefill each distinct prompt row once, then copy it G times
        out = lm(inputs_embeds=embeds[first], attention_mask=mask[first], position_ids=positions[first],
                 cache=cache, use_cache=True)
        self.attention_dtype = attention_dtype(cache.layers[0].keys.dtype, mask.device)
        self.keys, self.values = [], []  # each (R, H_kv, S, D), written in place by ``step``
        for layer in cache.layers:
            for prefix, store in ((layer.keys, self.keys), (layer.values, self.values)):
                shape = (rows, prefix.shape[1], self.capacity, prefix.shape[3])
                buffer = prefix.new_zeros(shape, dtype=self.attention_dtype)
                buffer[:, :, :length] = prefix.index_select(0, inverse)
                store.append(buffer)
        self.hidden = out.last_hidden_state[:, -1].index_select(0, inverse)  # (R, H): last token, final norm
        self.position = positions[:, -1:] + 1  # (R, 1) rotary position of the next token
        self.slot = torch.full((1,), length, dtype=torch.long, device=mask.device)  # its cache index
        dtype = self.attention_dtype
        self.bias = torch.zeros(rows, 1, 1, self.capacity, dtype=dtype, device=mask.device)
        self.bias[:, 0, 0, :length].masked_fill_(mask == 0, torch.finfo(dtype).min)
        self.bias[..., length:] = torch.finfo(dtype).min  # opened slot by slot as tokens are written
        table = torch.arange(self.capacity, device=mask.device)[None]
        cos, sin = lm.rotary_emb(embeds[:1, :1], table)  # (1, S, D) in the model dtype
        half = cos.shape[-1] // 2
        self.cos = cos[0]
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)  # rotate_half's sign folded in

    def step(self, x: torch.Tensor, span: int) -> torch.Tensor:
        """Feed one token per row: ``x`` (R, 1, H) embeddings -> ``hidden`` (R, H), updated in place.

        Attention reads cache slots ``[0, span)``; ``span`` must cover the slot written now (the eager loop
        passes exactly ``slot + 1``; a CUDA graph a bucket's end, the slots past ``slot`` masked by ``bias``).
        """
        rows = x.shape[0]
        self.bias.index_fill_(-1, self.slot, 0.0)
        where = self.position.view(-1)
        cos = self.cos.index_select(0, where)[:, None, None]  # (R, 1, 1, D)
        sin = self.sin.index_select(0, where)[:, None, None]
        bias = self.bias[..., :span]
        for layer, keys, values in zip(self.lm.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            dim, kv_heads = attn.head_dim, keys.shape[1]
            h = layer.input_layernorm(x)
            # (R, 1, heads * D) -> (R, heads, 1, D): the same memory with a single token
            q = attn.q_proj(h).view(rows, -1, 1, dim)
            k = attn.k_proj(h).view(rows, -1, 1, dim)
            v = attn.v_proj(h).view(rows, -1, 1, dim)
            q = q * cos + q.roll(dim // 2, -1) * sin
            k = k * cos + k.roll(dim // 2, -1) * sin
            keys.index_copy_(2, self.slot, k.to(keys.dtype))
            values.index_copy_(2, self.slot, v.to(values.dtype))
            heads = q.shape[1]
            # grouped-query attention: query heads g*j .. g*j+g-1 read kv head j (as ``repeat_kv``)
            scores = torch.matmul(q.view(rows, kv_heads, heads // kv_heads, dim).to(keys.dtype),
                                  keys[:, :, :span].transpose(2, 3)) * attn.scaling + bias
            probs = torch.softmax(scores, -1, dtype=torch.float32).to(values.dtype)
            out = torch.matmul(probs, values[:, :, :span]).reshape(rows, 1, heads * dim)
            x = x + attn.o_proj(out.to(x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.position.add_(1)
        self.slot.add_(1)
        self.hidden.copy_(self.lm.norm(x)[:, 0])
        return self.hidden


def run_steps(body: Callable[[int, bool], None], steps: int, decoder: StaticDecoder, *, graphs: bool,
              state: list[torch.Tensor], bucket: int = 64) -> None:
    """Run ``body(span, advance)`` ``steps`` times: draw one token, record it and, when ``advance``, feed it to
    ``decoder`` (``decoder.step(x, span)``).

    Eager (``graphs=False``): ``span`` is exactly the filled length after the write, and the last token is not
    fed. ``graphs=True``: ``body`` must keep all its state in tensors (no Python counters); ``state`` lists
    every tensor it mutates besides the decoder's (step counter, outputs). After a two-step warm-up the state is
    restored, then one graph per ``bucket`` cache slots is captured and replayed; every step feeds its token
    (the last one into the cache's last slot, never read). On a CPU model the same protocol runs without
    capture, each replay an eager call: what a CUDA run replays, checkable where there is no GPU (tests).
    """
    start = decoder.prompt_length
    if not graphs:
        for i in range(steps):
            body(start + i + 1, i + 1 < steps)
        return
    capture = decoder.hidden.device.type == "cuda"
    kept = [decoder.hidden, decoder.position, decoder.slot, decoder.bias, *state]
    saved = [t.clone() for t in kept]
    side = torch.cuda.Stream() if capture else None
    if capture:  # warm-up off the capture stream, as ``torch.cuda.graph`` asks
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if capture else contextlib.nullcontext():
        for _ in range(2):
            body(decoder.capacity, True)
    if capture:
        torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(kept, saved, strict=True):
        t.copy_(s)
    ends = list(range(start + bucket, decoder.capacity, bucket)) + [decoder.capacity]
    replay: dict[int, Callable[[], None]] = {}
    pool = torch.cuda.graph_pool_handle() if capture else None
    for end in ends:
        if capture:  # capture records kernels without running them: the state stays as restored
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                body(end, True)
            replay[end] = graph.replay
        else:
            replay[end] = functools.partial(body, end, True)
    for i in range(steps):
        filled = start + i + 1
        replay[next(e for e in ends if e >= filled)]()
