"""The ``emu3`` backbone: BAAI's Emu3 (Wang et al. 2024, arXiv:2409.18869) as a suder ``UnifiedLMM``.

Emu3 is one decoder-only transformer over one vocabulary of text BPE tokens and 32,768 "visual tokens" (the codes
of its VQ-VAE, 8x downsampling). transformers implements both directions in ``Emu3ForConditionalGeneration``
(the language model) and ``Emu3VQVAE`` (the image tokenizer), so this package adds only the suder protocol on top.
BAAI released two checkpoints of the same architecture, ``BAAI/Emu3-Gen-hf`` (text-to-image) and
``BAAI/Emu3-Chat-hf`` (image-to-text); suder's ``separate`` strategy trains one for each direction, and either one
alone runs in the other strategies.

Sequences (the layout of BAAI's processor, ``mode="G"`` and ``mode="U"``):

- text-to-image: ``<bos> prompt positive_prompt <boi> "H*W" <img>`` then ``H`` rows of ``W`` visual tokens, each row
  followed by the end-of-line token ``<|extra_200|>``; left-padded. The unconditional row of classifier-free
  guidance is the same with ``negative_prompt`` in place of the prompt (BAAI's published generation recipe).
- captioning: ``<bos> "You are a helpful assistant. USER: " <boi> "H*W" <img> rows <eof> <eoi> caption_prompt
  ". ASSISTANT:"`` then the caption and ``<eos>``, right-padded.

The policies suder trains and scores:

- images: each of the ``H * W`` codes is drawn from the visual tokens only (the end-of-line tokens are fixed by the
  layout, as BAAI's prefix-constrained decoding fixes them, so they carry no log-prob). Guided logits are
  ``uncond + s * (cond - uncond)`` over the visual tokens, which renormalises to BAAI's log-space rule
  ``s * (log p_cond - log p_uncond) + log p_uncond`` (transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``)
  restricted to them; then the temperature, then ``top_k`` (BAAI: 2048) over the visual tokens.
- captions: any token except the visual ones. ``.logps`` of both samplers equal the teacher-forced log-probs of the
  same policy (``suder.testing``); temperature 0 is greedy, scored under the untempered policy.

Departures from BAAI's demo code: every image has one fixed size (``image_size``, square: 720 px and 90 x 90 codes
as BAAI's ``image_area=720*720, ratio="1:1"``), so a sampled image is captioned from its codes without a decode and
re-encode; input images are resized (bicubic) to that size before the VQ-VAE encodes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from suder.errors import BackboneError
from suder.protocol import ImageSamples, TextSamples, TokenLogProbs, repeat_interleave
from suder.sampling import caption_loop, left_pad, multinomial_rows, right_pad

SETTINGS_FILE = "suder_emu3.json"
UND_FOLDER = "und"  # the captioning checkpoint of a two-checkpoint backbone, inside the saved folder
EOL, EOF, BOI, EOI, IMG = "<|extra_200|>", "<|extra_201|>", "<|image start|>", "<|image end|>", "<|image token|>"
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, "
    "low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)


@dataclass
class Emu3Settings:
    """How the model is prompted and sampled; the defaults are BAAI's published settings (README of Emu3-Gen)."""

    image_size: int = 720  # pixels, square; H = W = image_size / 8 codes
    guidance_scale: float = 3.0  # classifier-free guidance; 1.0 turns it off
    top_k: int | None = 2048  # over the visual tokens; None: all of them
    positive_prompt: str = " masterpiece, film grained, best quality."
    negative_prompt: str = NEGATIVE_PROMPT
    system_prompt: str = "You are a helpful assistant."
    caption_prompt: str = "Please describe the image"
    max_caption_tokens: int = 64


class Emu3Backbone(nn.Module):
    """``Emu3ForConditionalGeneration`` + its tokenizer and image processor, as a ``UnifiedLMM``.

    ``und_model``: a second checkpoint of the same architecture that captions (BAAI's Emu3-Chat beside Emu3-Gen);
    ``model`` then only draws. Each direction trains its own checkpoint, and each scores the other's samples for
    the dual self-rewards. The VQ-VAE of ``model`` encodes and decodes images for both."""

    name = "emu3"
    row_generators = True  # samplers take one generator per row (suder.sampling.Generators)

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, settings: Emu3Settings | None = None,
                 und_model: Any = None):
        super().__init__()
        self.model = model
        self.und_model = und_model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings or Emu3Settings()
        vq = model.model.vqmodel
        factor = vq.vision_spatial_factor
        if self.settings.image_size % factor:
            size = self.settings.image_size
            raise BackboneError(f"image_size {size} is not a multiple of Emu3's VQ factor {factor}; pick one that is.")
        self.grid = self.settings.image_size // factor  # H = W
        mapping = model.model.vocabulary_mapping
        codes = vq.config.codebook_size
        # visual token id of each code, in code order: (K,)
        self.register_buffer("visual_ids", mapping.img2bpe_mapping_tensor[:codes].long(), persistent=False)
        ids = tokenizer.convert_tokens_to_ids([EOL, EOF, BOI, EOI, IMG])
        self.eol, self.eof, self.boi, self.eoi, self.img = ids
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        for lm in self._lms():
            lm.model.vqmodel.requires_grad_(False)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def guidance_scale(self) -> float:
        return self.settings.guidance_scale

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    def _lms(self) -> list[Any]:
        return [self.model] + ([self.und_model] if self.und_model is not None else [])

    def lm(self, direction: str) -> Any:
        """The checkpoint that serves ``direction``: ``und_model`` captions when there is one."""
        return self.und_model if direction == "und" and self.und_model is not None else self.model

    def train(self, mode: bool = True) -> Emu3Backbone:
        super().train(mode)
        for lm in self._lms():
            lm.model.vqmodel.eval()  # frozen, as in transformers
        return self

    def trainable_parameters(self, direction: str) -> list[nn.Parameter]:
        """The language model (embeddings, decoder, head) of the direction's checkpoint; the VQ-VAE stays frozen."""
        lm = self.lm(direction)
        return list(lm.model.text_model.parameters()) + list(lm.lm_head.parameters())

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        for lm in self._lms():
            lm.gradient_checkpointing_enable(**kwargs)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _size_tokens(self) -> str:
        return f"{BOI}{self.grid}*{self.grid}{IMG}"

    def _hidden(self, ids, mask, cache=None, positions=None, direction: str = "gen") -> torch.Tensor:
        if positions is None:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.lm(direction).model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=cache is not None)
        return out.last_hidden_state

    def _image_logits(self, hidden: torch.Tensor, scale: float | None) -> torch.Tensor:
        """(R, ..., H) hidden states -> (n, ..., K) logits over the visual tokens, guided when ``scale`` is set
        (rows ``[cond; uncond]``)."""
        head = self.model.lm_head.weight.index_select(0, self.visual_ids)
        logits = nn.functional.linear(hidden, head).float()
        if scale is None:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + scale * (cond - uncond)

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits with the visual tokens ruled out (captions are text)."""
        logits = self.lm("und").lm_head(hidden).float()
        return logits.index_fill(-1, self.visual_ids, float("-inf"))

    def _policy(self, options: dict[str, Any]) -> float | None:
        """The guidance scale of the scored policy, None when unguided."""
        policy = options.get("policy", "guided")
        if policy not in ("cond", "guided"):
            raise ValueError(f"policy must be 'cond' or 'guided', got {policy!r}")
        scale = options.get("guidance_scale")
        scale = self.settings.guidance_scale if scale is None else float(scale)
        return scale if policy == "guided" and scale != 1.0 else None

    # ------------------------------------------------------------------ images
    def image_codes(self, images: Sequence[Any] | ImageSamples | torch.Tensor) -> torch.Tensor:
        """(B, H*W) codes of sampled images (their tokens), code tensors, or PIL images (resized, VQ-encoded)."""
        if isinstance(images, ImageSamples):
            return images.tokens.to(self.device)
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        import numpy as np
        from PIL import Image

        size, p = self.settings.image_size, self.image_processor
        arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * p.rescale_factor
        mean = torch.tensor(p.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(p.image_std).view(1, 3, 1, 1)
        vq = self.model.model.vqmodel
        pixels = ((pixels - mean) / std).to(self.device, vq.dtype)
        with torch.no_grad():
            out = vq.encode(pixels, torch.tensor([[size, size]] * len(arrays)), return_dict=True)
        return torch.stack(out.image_tokens).flatten(1).long()

    def decode_images(self, codes: torch.Tensor) -> list[Any]:
        """(B, H*W) codes -> B PIL images through the VQ-VAE decoder and the image processor's postprocess."""
        vq = self.model.model.vqmodel
        with torch.no_grad():
            pixels = vq.decode(codes.to(self.device).view(-1, self.grid, self.grid)).float().cpu()
        return self.image_processor.postprocess(list(pixels), return_tensors="PIL.Image.Image")["pixel_values"]

    def _body(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, H*W) codes -> (B, H*(W+1)) token ids: each row of visual tokens followed by the end-of-line token."""
        rows = self.visual_ids[codes].view(-1, self.grid, self.grid)
        eol = rows.new_full((rows.shape[0], self.grid, 1), self.eol)
        return torch.cat([rows, eol], -1).flatten(1)

    def t2i_inputs(self, prompts: Sequence[str], guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded generation prefixes, ids and mask (R, L); R = 2B rows ``[cond; uncond]`` when guided."""
        s = self.settings
        texts = [p + s.positive_prompt for p in prompts] + ([s.negative_prompt] * len(prompts) if guided else [])
        seqs = [[self.bos, *self._encode(t + self._size_tokens())] for t in texts]
        return left_pad(seqs, self.pad, self.device)

    @torch.no_grad()
    def sample_image(
        self,
        prompts: Sequence[str],
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        **options: Any,
    ) -> ImageSamples:
        """KV-cached sampling of H x W codes per image, cond and uncond rows in one batch when guided; the
        end-of-line token is fed after each row (``top_k`` option: default the backbone's)."""
        scale = self.settings.guidance_scale if guidance_scale is None else float(guidance_scale)
        guide = scale if scale != 1.0 else None
        top_k = options.get("top_k", self.settings.top_k)
        rows = repeat_interleave(list(prompts), num_samples)
        ids, mask = self.t2i_inputs(rows, guide is not None)
        from transformers import DynamicCache

        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self._hidden(ids, mask, cache, positions)[:, -1]
        next_pos = positions[:, -1:] + 1
        n, total = len(rows), self.num_image_tokens
        tokens = torch.empty(n, total, dtype=torch.long, device=self.device)
        logps = torch.empty(n, total, device=self.device)
        for t in range(total):
            code, logp = _sample(self._image_logits(hidden, guide), temperature, top_k, generator)
            tokens[:, t], logps[:, t] = code, logp
            if t + 1 == total:
                break
            feed = self.visual_ids[code][:, None]
            if (t + 1) % self.grid == 0:  # end of a row: the layout's end-of-line token follows
                feed = torch.cat([feed, torch.full_like(feed, self.eol)], 1)
            if guide is not None:
                feed = feed.repeat(2, 1)
            width = feed.shape[1]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], width)], 1)
            step_pos = next_pos + torch.arange(width, device=self.device)
            hidden = self._hidden(feed, mask, cache, step_pos)[:, -1]
            next_pos = next_pos + width
        return ImageSamples(prompts=rows, tokens=tokens, logps=logps, num_samples=num_samples, guidance_scale=scale,
                            temperature=temperature, decode=self.decode_images)

    def logp_image_given_text(
        self, images: Sequence[Any] | ImageSamples, texts: Sequence[str] | TextSamples, **options: Any
    ) -> TokenLogProbs:
        """log p(codes | prompt), (B, H*W), one teacher-forced forward. Options: ``policy`` ("guided", the default,
        or "cond"), ``guidance_scale`` (default the backbone's), ``temperature``, ``top_k`` (as the sampler)."""
        prompts = list(texts.texts) if isinstance(texts, TextSamples) else list(texts)
        codes = self.image_codes(images)
        assert codes.shape == (len(prompts), self.num_image_tokens), f"codes {tuple(codes.shape)}, {len(prompts)} texts"
        guide = self._policy(options)
        ids, mask = self.t2i_inputs(prompts, guide is not None)
        body = self._body(codes)[:, :-1]  # the last end-of-line predicts nothing we score
        body = body.repeat(2, 1) if guide is not None else body
        ids = torch.cat([ids, body], 1)
        mask = torch.cat([mask, torch.ones_like(body)], 1)
        start = ids.shape[1] - body.shape[1] - 1  # the position whose output predicts the first code
        at = start + torch.arange(self.num_image_tokens, device=self.device)
        at = at + at.sub(start).div(self.grid, rounding_mode="floor")  # skip the end-of-line positions
        hidden = self._hidden(ids, mask).index_select(1, at)
        step = _tempered(self._image_logits(hidden, guide), options.get("temperature", 1.0))
        step = _top_k(step, options.get("top_k", self.settings.top_k))
        values = torch.log_softmax(step, -1).gather(-1, codes[..., None]).squeeze(-1)
        return TokenLogProbs(values, torch.ones_like(values, dtype=torch.bool))

    # ------------------------------------------------------------------ captions
    def i2t_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L) caption prefixes (all the same length: one image size)."""
        s = self.settings
        head = [self.bos, *self._encode(f"{s.system_prompt} USER: {self._size_tokens()}")]
        tail = self._encode(f"{EOF}{EOI}{s.caption_prompt}. ASSISTANT:")
        b = codes.shape[0]
        return torch.cat([
            torch.tensor(head, device=self.device).expand(b, -1),
            self._body(codes),
            torch.tensor(tail, device=self.device).expand(b, -1),
        ], 1)

    @torch.no_grad()
    def sample_text(
        self,
        images: Sequence[Any] | ImageSamples,
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        **options: Any,
    ) -> TextSamples:
        """KV-cached caption sampling, at most ``max_caption_tokens`` (option ``max_tokens``); 0 is greedy."""
        codes = self.image_codes(images).repeat_interleave(num_samples, 0)
        ids = self.i2t_inputs(codes)
        n, limit = ids.shape[0], int(options.get("max_tokens", self.settings.max_caption_tokens))
        from transformers import DynamicCache

        cache = DynamicCache()
        mask = torch.ones_like(ids)

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal mask
            mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
            hidden = self._hidden(token, mask, cache, mask.sum(-1, keepdim=True) - 1, direction="und")[:, -1]
            return self._text_logits(hidden)

        first = self._text_logits(self._hidden(ids, mask, cache, direction="und")[:, -1])
        tokens, logps, alive = caption_loop(first, step, lambda lg, t, g: _sample(lg, t, None, g), limit=limit,
                                            eos=self.eos, pad=self.pad, temperature=temperature, generator=generator)
        width = int(alive.sum(-1).max())
        texts = [self.tokenizer.decode(row[alive[i]].tolist(), skip_special_tokens=True).strip()
                 for i, row in enumerate(tokens)]
        sources = images if isinstance(images, ImageSamples) else repeat_interleave(list(images), num_samples)
        if isinstance(sources, ImageSamples):
            sources = sources.select(torch.arange(len(sources)).repeat_interleave(num_samples))
        return TextSamples(texts=texts, tokens=tokens[:, :width], logps=logps[:, :width], mask=alive[:, :width],
                           images=sources, num_samples=num_samples, temperature=temperature)

    def _caption_tokens(self, texts: Sequence[str] | TextSamples) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, TextSamples):
            return texts.tokens.to(self.device), texts.mask.to(self.device)
        # the reply follows "ASSISTANT:" after a space, as sampled captions do before they are stripped
        return right_pad([self._encode(" " + t.strip()) + [self.eos] for t in texts], self.pad, self.device)

    def logp_text_given_image(
        self, texts: Sequence[str] | TextSamples, images: Sequence[Any] | ImageSamples, **options: Any
    ) -> TokenLogProbs:
        """log p(caption + <eos> | image), (B, T), one teacher-forced forward, right-padded (``temperature``)."""
        tokens, tmask = self._caption_tokens(texts)
        codes = self.image_codes(images)
        assert codes.shape[0] == tokens.shape[0], f"{codes.shape[0]} images for {tokens.shape[0]} texts"
        prefix = self.i2t_inputs(codes)
        ids = torch.cat([prefix, tokens], 1)
        mask = torch.cat([torch.ones_like(prefix), tmask.long()], 1)
        hidden = self._hidden(ids, mask, direction="und")[:, prefix.shape[1] - 1 : -1]
        step = _tempered(self._text_logits(hidden), options.get("temperature", 1.0))
        values = torch.log_softmax(step, -1).gather(-1, tokens[..., None]).squeeze(-1)
        return TokenLogProbs(values.masked_fill(~tmask, 0.0), tmask)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """A transformers folder (model, tokenizer, image processor) plus ``suder_emu3.json`` (the settings);
        ``und_model``, if any, in the subfolder ``und/`` (a transformers model folder)."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        if self.und_model is not None:
            self.und_model.save_pretrained(os.path.join(path, UND_FOLDER))
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        with open(os.path.join(path, SETTINGS_FILE), "w") as f:
            json.dump(asdict(self.settings), f, indent=2)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Scoring divides by the temperature; 0 (greedy) scores under the untempered policy."""
    t = float(temperature)
    if t < 0:
        raise BackboneError(f"temperature must be >= 0 (0 is greedy), got {t}.")
    return logits if t in (0.0, 1.0) else logits / t


def _top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value kept), the rest -inf."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(int(k), -1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """One index per row of (B, V) float logits and its log-prob under the sampling policy; 0 is greedy, with
    the chosen token's untempered log-prob."""
    step = _top_k(_tempered(logits, temperature), top_k)
    logp = torch.log_softmax(step, -1)
    if temperature == 0:
        choice = step.argmax(-1, keepdim=True)
    else:
        choice = multinomial_rows(logp.exp(), generator)  # one generator, or one per row
    return choice.squeeze(-1), logp.gather(-1, choice).squeeze(-1)


def settings_from(raw: dict[str, Any]) -> Emu3Settings:
    known = {f.name for f in fields(Emu3Settings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BackboneError(f"Unknown emu3 option(s) {unknown}; valid: {', '.join(sorted(known))}.")
    return Emu3Settings(**raw)
