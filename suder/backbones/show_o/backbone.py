"""The ``show-o`` backbone: Show-o (Xie et al. 2024, arXiv:2408.12528) behind suder's ``UnifiedLMM`` protocol.

- ``sample_image``: Show-o's MaskGIT sampler (``sampling.maskgit_sample``), 18 cosine steps by default,
  guidance ``(1 + g) cond - g uncond`` with cond and uncond rows in one batch. ``guidance_scale`` follows
  Show-o's convention: 0 means no guidance (suder's toy uses 1 for that).
- ``logp_image_given_text``: **an estimate**. A masked-token model has no exact sequence likelihood; we use
  diffu-GRPO's mean-field "one-step per-token log-probability estimation" (Zhao et al. 2025, "d1: Scaling
  Reasoning in Diffusion LLMs via RL", arXiv:2504.12216, the diffu-GRPO section): log p(x | c) ~ sum_i log
  p(x_i | c, all image tokens masked), one forward with every image position set to the mask token,
  ``log_softmax`` over the 8192 image columns (the sampler's support), gather the scored codes; with
  ``policy="guided"`` the guided logits are normalised.
  Departures from d1: d1 perturbs the *prompt* with random masks; text has no mask token in Show-o, so the
  optional perturbation (``remask_ratio < 1``) re-masks a random subset of the *image* instead, the rest
  staying visible, and only the re-masked positions are scored (``mask``). ``TokenLogProbs.estimate`` is True.
- ``ImageSamples.logps`` are the same estimator's values on the final tokens (one extra forward), not the
  per-step sampling probabilities, so GRPO's first importance ratio is exactly 1 by construction.
- ``sample_text`` / ``logp_text_given_image``: exact causal log-probs of captions after
  ``<|mmu|> <|soi|> image <|eoi|> bos``, KV-cached decoding, normalised over the 50295 text columns (the
  sampler's support; the image and special tokens are never drawn) or, with ``caption_logp_vocab="full"``,
  over the whole vocabulary as Show-o's loss; ``temperature`` as for the toy backbone, 0 is greedy.
- ``show-o-w-clip-vit`` checkpoints caption from CLIP-ViT features through ``mm_projector`` (``clip.py``), as
  they were trained to; their image generation is the same MaskGIT path.

Show-o's sampler applies no temperature to token probabilities (it only anneals the re-masking noise), so the
image estimator ignores ``temperature``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import BackboneError, DataError
from ...protocol import ImageSamples, TextSamples, TokenLogProbs, repeat_interleave
from ...sampling import caption_loop
from .clip import DEFAULT_VISION_TOWER, SYSTEM_PROMPT, ClipVisionTower, mmu_vit_attention_mask
from .magvit import MAGVITv2, image_to_tensor, tensor_to_images
from .modeling import Showo
from .prompting import (
    ShowoTokens,
    add_special_tokens,
    mmu_attention_mask,
    mmu_prefix,
    t2i_attention_mask,
    t2i_sequences,
)
from .sampling import draw, guided, mask_schedule, maskgit_sample

SETTINGS_FILE = "suder_show_o.json"
VQ_FOLDER = "magvitv2"
TOKENIZER_FOLDER = "tokenizer"
CLIP_FOLDER = "clip_vit"
DEFAULTS = {"model": "showlab/show-o", "vq_model": "showlab/magvitv2", "tokenizer": "microsoft/phi-1_5"}
CHUNK = 16  # images per VQ encode/decode call


# Show-o's README (showlab/Show-o), text-to-image demos: ``configs/showo_demo.yaml`` (256 px) with
# ``guidance_scale=1.75 generation_timesteps=18``; ``configs/showo_demo_512x512.yaml`` with
# ``guidance_scale=5 generation_timesteps=50``.
README_SAMPLING = {256: {"guidance_scale": 1.75, "steps": 18}, 512: {"guidance_scale": 5.0, "steps": 50}}
CAPTION_VOCABS = ("text", "full")


def readme_sampling(resolution: int) -> dict[str, float]:
    """Guidance scale and MaskGIT steps of Show-o's README text-to-image demos for a resolution (256 px: 1.75
    and 18 steps; 512 px: 5 and 50 steps; other resolutions take the closer of the two)."""
    return README_SAMPLING[512 if resolution >= 512 else 256]


@dataclass
class ShowOSettings:
    """How the backbone is used; saved beside its weights (``suder_show_o.json``).

    ``guidance_scale`` and ``steps``: None means the value of Show-o's README text-to-image demo for the
    model's resolution (``readme_sampling``: 1.75 and 18 steps at 256 px, 5 and 50 steps at 512 px).
    ``caption_logp_vocab``: what caption log-probs are normalised over: ``"text"`` (default) the text
    tokens, the support the captions are drawn from; ``"full"`` the whole vocabulary (text, special and image
    tokens), as Show-o's training loss and ``mmu_generate`` do. Captions are drawn from the text tokens either
    way.
    ``caption_prompt``: "" scores/samples captions in Show-o's captioning format (``bos caption eos``);
    a question uses the chat format of ``inference_mmu.py``:
    ``bos USER: \\n{question} ASSISTANT: caption eos``.
    """

    guidance_scale: float | None = None
    steps: int | None = None
    schedule: str = "cosine"
    max_caption_tokens: int = 64
    caption_prompt: str = ""
    caption_logp_vocab: str = "text"


class ShowOBackbone(nn.Module):
    """Show-o + MAGVIT-v2 + Phi-1.5 tokenizer as a ``UnifiedLMM`` (see the module docstring)."""

    name = "show-o"
    row_generators = True  # samplers take one generator per row (``suder.sampling.Generators``)

    def __init__(
        self,
        showo: Showo,
        vq: MAGVITv2,
        tokenizer: Any,
        settings: ShowOSettings | None = None,
        vision: ClipVisionTower | None = None,
    ):
        super().__init__()
        self.model = showo
        self.vq = vq.eval().requires_grad_(False)
        if bool(showo.config.w_clip_vit) != (vision is not None):
            raise BackboneError(
                "A show-o-w-clip-vit model captions from CLIP-ViT features and needs its vision tower (and only "
                f"such a model takes one): pass vision_tower= (showlab's is {DEFAULT_VISION_TOWER}) with "
                "w_clip_vit checkpoints, and none otherwise."
            )
        self.vision = vision
        self.settings = settings or ShowOSettings()
        cfg = showo.config
        self.tokenizer = add_special_tokens(tokenizer, cfg.llm_vocab_size)
        self.tokens = ShowoTokens.from_config(cfg, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
        if vq.codebook_size != cfg.codebook_size:
            raise BackboneError(f"The VQ model has {vq.codebook_size} codes but Show-o expects {cfg.codebook_size}.")
        side = math.isqrt(cfg.num_vq_tokens)
        if side * side != cfg.num_vq_tokens:
            raise BackboneError(f"num_vq_tokens {cfg.num_vq_tokens} is not a square grid.")
        self.resolution = side * vq.downsample_factor
        readme = readme_sampling(self.resolution)
        if self.settings.guidance_scale is None:
            self.settings.guidance_scale = readme["guidance_scale"]
        if self.settings.steps is None:
            self.settings.steps = int(readme["steps"])
        mask_schedule(self.settings.schedule)  # fail early on an unknown schedule
        if self.settings.caption_logp_vocab not in CAPTION_VOCABS:
            raise BackboneError(
                f"Unknown caption_logp_vocab {self.settings.caption_logp_vocab!r}; show-o normalises caption "
                "log-probs over 'text' (the text tokens) or 'full' (the whole vocabulary): pick one of them."
            )
        question = self.settings.caption_prompt
        if vision is None:
            self._question = self._encode(f"USER: \n{question} ASSISTANT:") if question else []
        else:  # the llava "phi1.5" template of inference_mmu.py, after the system prompt (clip.py)
            self._question = self._encode(f"USER: {question} ASSISTANT:") if question else []
            self._system = self._encode(SYSTEM_PROMPT) if question else []

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.showo.lm_head.weight.device

    @property
    def guidance_scale(self) -> float:
        return float(self.settings.guidance_scale)

    def trainable_parameters(self, direction: str) -> list[nn.Parameter]:
        """Both directions train the whole Show-o transformer (``showo.*``); understanding also trains
        ``mm_projector`` on CLIP-ViT checkpoints (as showlab's instruction tuning). The MAGVIT-v2 tokenizer and
        the CLIP vision tower are always frozen."""
        if direction not in ("gen", "und"):
            raise ValueError(f"direction must be 'gen' or 'und', got {direction!r}")
        params = list(self.model.showo.parameters())
        if direction == "und" and self.vision is not None:
            params += list(self.model.mm_projector.parameters())
        return params

    def gradient_checkpointing_enable(self) -> None:
        self.model.showo.gradient_checkpointing_enable()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_codes(self, images: Sequence[Any] | ImageSamples | torch.Tensor) -> torch.Tensor:
        """(B, N) codes in [0, 8192): ``ImageSamples.tokens``, a (B, N) long tensor, (B, 3, R, R) pixels in
        [-1, 1], or PIL images (resized and centre-cropped to the model's resolution, then VQ-encoded)."""
        if isinstance(images, ImageSamples):
            codes = images.tokens
        elif isinstance(images, torch.Tensor) and images.dim() == 2:
            codes = images
        else:
            if isinstance(images, torch.Tensor):
                pixels = images
            else:
                try:
                    pixels = torch.stack([image_to_tensor(im, self.resolution) for im in images])
                except (AttributeError, TypeError, ValueError) as exc:
                    raise DataError(f"Cannot read the images passed to show-o: {exc}") from exc
            dtype = self.vq.decoder.conv_in.weight.dtype
            codes = torch.cat(
                [self.vq.get_code(pixels[i : i + CHUNK].to(self.device, dtype)) for i in range(0, len(pixels), CHUNK)]
            )
        n = self.tokens.num_image_tokens
        assert codes.dim() == 2 and codes.shape[1] == n, f"expected (B, {n}) image codes, got {tuple(codes.shape)}"
        return codes.to(self.device).long()

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> list[Any]:
        """(B, N) codes -> PIL images (resolution x resolution)."""
        out: list[Any] = []
        for i in range(0, codes.shape[0], CHUNK):
            out += tensor_to_images(self.vq.decode_code(codes[i : i + CHUNK].to(self.device)))
        return out

    # ------------------------------------------------------------------ text -> image
    def _t2i_inputs(self, prompts: list[str], image_ids: torch.Tensor, cfg: bool, drop: torch.Tensor | None = None):
        """ids (B or 2B, L) with [cond; uncond] rows, and their omni-attention mask.

        ``drop``: optional (B, M + 1) bool over the cond rows' text slots; the prompt tokens it marks become the
        pad id (the filler of the unconditional prompt) and no other position sees them, as pads in Show-o."""
        texts = [self._encode(p) for p in prompts]
        if cfg:
            texts, image_ids = texts + [[]] * len(prompts), image_ids.repeat(2, 1)
        ids = t2i_sequences(texts, image_ids, self.tokens)
        if drop is None:
            return ids, t2i_attention_mask(ids, self.tokens)
        width = self.tokens.max_text_len + 1
        hidden = torch.zeros_like(ids, dtype=torch.bool)
        hidden[: len(prompts), :width] = drop.to(ids.device) & self._prompt_slots(ids[: len(prompts), :width])
        mask = t2i_attention_mask(ids, self.tokens, hidden)  # built on the undropped ids: pads stay a left block
        return ids.masked_fill(hidden, self.tokens.pad), mask

    def _prompt_slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, M + 1) text blocks -> bool, the prompt's own tokens: after ``<|t2i|> bos``, before the last eos."""
        idx = torch.arange(blocks.shape[1], device=blocks.device)
        start = (blocks == self.tokens.t2i).long().argmax(1) + 2
        return (idx[None, :] >= start[:, None]) & (idx[None, :] < blocks.shape[1] - 1)

    def _image_logits(self, ids: torch.Tensor, mask: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        """(B, N, K) float32 logits over the K image codes at the image positions (guided when ``cfg``)."""
        n, off, k = self.tokens.num_image_tokens, self.tokens.image_offset, self.tokens.codebook_size
        hidden = self.model.hidden_states(ids, mask)[:, -(n + 1) : -1]
        logits = self.model.head(hidden, off, off + k)
        return guided(*logits.chunk(2), scale) if cfg else logits

    def _policy(self, options: dict[str, Any]) -> tuple[bool, float]:
        scale = options.get("guidance_scale")
        scale = self.guidance_scale if scale is None else float(scale)
        policy = options.get("policy", "guided")
        if policy not in ("cond", "guided"):
            raise ValueError(f"policy must be 'cond' or 'guided', got {policy!r}")
        return policy == "guided" and scale != 0, scale

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
        """MaskGIT sampling of ``num_samples`` images per prompt (options: ``steps``, ``schedule``).

        ``temperature`` scales Show-o's re-masking noise only (token draws are never tempered); 0 is greedy:
        arg-max codes, noise-free re-masking, the generator unused. ``.logps`` are the plain one-step estimate
        under the guided policy, whatever the temperature."""
        rows = repeat_interleave(list(prompts), num_samples)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        cfg = scale != 0
        n, mask_id, off = self.tokens.num_image_tokens, self.tokens.mask, self.tokens.image_offset
        start = torch.full((len(rows), n), -1, dtype=torch.long, device=self.device)
        ids, attn = self._t2i_inputs(rows, torch.full_like(start, mask_id), cfg)

        def image_logits(codes: torch.Tensor) -> torch.Tensor:
            image = torch.where(codes < 0, mask_id, codes + off)
            ids[:, -(n + 1) : -1] = image.repeat(2, 1) if cfg else image
            return self._image_logits(ids, attn, cfg, scale)

        tokens = maskgit_sample(
            image_logits,
            start,
            steps=int(options.get("steps", self.settings.steps)),
            temperature=temperature,
            schedule=options.get("schedule", self.settings.schedule),
            generator=generator,
        )
        logps = self.logp_image_given_text(tokens, rows, policy="guided", guidance_scale=scale).values
        return ImageSamples(
            prompts=rows,
            tokens=tokens,
            logps=logps,
            num_samples=num_samples,
            guidance_scale=scale,
            temperature=temperature,
            decode=self.decode_images,
        )

    def logp_image_given_text(
        self, images: Sequence[Any] | ImageSamples, texts: Sequence[str] | TextSamples, **options: Any
    ) -> TokenLogProbs:
        """One-step unmasking estimate of log p(image codes | text): (B, N), ``estimate=True``.

        Options: ``policy`` ("guided" (default) or "cond"), ``guidance_scale`` (default: the backbone's),
        ``remask_ratio`` (default 1: every image position masked; below 1, that fraction is masked at random
        and only those positions are scored), ``prompt_drop`` (default 0: each prompt token is dropped with this
        probability, i.e. replaced by the pad token of the unconditional prompt and hidden like a pad; SUDER
        A.4 / diffu-GRPO's "randomly dropped input text tokens"), with ``remask_seed`` or ``generator``
        (required when either perturbation is on; it draws the re-masking first, then the drops: pass a fresh
        seed per inner iteration, the same for the old and the new policy). ``temperature`` is accepted and
        ignored.
        """
        prompts = list(texts.texts) if isinstance(texts, TextSamples) else list(texts)
        codes = self.image_codes(images)
        assert codes.shape[0] == len(prompts), f"{codes.shape[0]} images for {len(prompts)} texts"
        cfg, scale = self._policy(options)
        gen = _perturbation_generator(options)
        scored = self._remask(codes, options, gen)
        drop = self._prompt_drop(len(prompts), options, gen)
        image_ids = torch.where(scored, self.tokens.mask, codes + self.tokens.image_offset)
        ids, attn = self._t2i_inputs(prompts, image_ids, cfg, drop)
        logits = self._image_logits(ids, attn, cfg, scale)
        values = _gather_logps(logits, codes) * scored
        return TokenLogProbs(values, scored, estimate=True)

    def _remask(self, codes: torch.Tensor, options: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
        """(B, N) bool: the positions that are masked in the input and scored."""
        ratio = float(options.get("remask_ratio", 1.0))
        if not 0 < ratio <= 1:
            raise ValueError(f"remask_ratio must be in (0, 1], got {ratio}")
        if ratio == 1:
            return torch.ones_like(codes, dtype=torch.bool)
        if gen is None:
            raise ValueError("remask_ratio < 1 needs remask_seed= or generator= (the same for old and new logps)")
        b, n = codes.shape
        noise = torch.rand((b, n), generator=gen, device=gen.device).to(codes.device)
        count = max(1, round(ratio * n))
        picked = noise.argsort(-1)[:, :count]
        return torch.zeros_like(codes, dtype=torch.bool).scatter(1, picked, True)

    def _prompt_drop(self, rows: int, options: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor | None:
        """(rows, M + 1) bool over the text slots, each True with probability ``prompt_drop`` (None when 0);
        ``_t2i_inputs`` keeps only the slots that hold prompt tokens."""
        p = float(options.get("prompt_drop", 0.0))
        if not 0 <= p < 1:
            raise ValueError(f"prompt_drop must be in [0, 1), got {p}")
        if p == 0:
            return None
        if gen is None:
            raise ValueError("prompt_drop > 0 needs remask_seed= or generator= (the same for old and new logps)")
        return torch.rand((rows, self.tokens.max_text_len + 1), generator=gen, device=gen.device) < p

    # ------------------------------------------------------------------ image -> text
    def _pil_images(self, images: Sequence[Any] | ImageSamples | torch.Tensor) -> list[Any]:
        """PIL images for the CLIP processor: decoded from codes when given codes or ``ImageSamples``."""
        if isinstance(images, ImageSamples):
            return images.images
        if isinstance(images, torch.Tensor):
            return self.decode_images(images) if images.dim() == 2 else tensor_to_images(images)
        return list(images)

    def _und_hidden(
        self, images: Any, repeat: int, tokens: torch.Tensor | None = None, cache: Any = None
    ) -> tuple[torch.Tensor, int]:
        """Hidden states (B * repeat, P + T, H) of the understanding prefix (P positions) followed by ``tokens``
        (B * repeat, T), and P. MAGVIT checkpoints: ids ``<|mmu|> <|soi|> codes <|eoi|> bos [question]``;
        CLIP-ViT checkpoints: embeddings with projected CLIP features (``clip.py``)."""
        if self.vision is None:
            codes = self.image_codes(images).repeat_interleave(repeat, 0)
            ids = mmu_prefix(codes + self.tokens.image_offset, self.tokens, self._question)
            p = ids.shape[1]
            if tokens is not None:
                ids = torch.cat([ids, tokens], 1)
            return self.model.hidden_states(ids, mmu_attention_mask(ids, self.tokens), cache), p
        proj = self.model.mm_projector
        features = self.vision(self._pil_images(images)).to(self.device, proj[0].weight.dtype)
        image = proj(features).repeat_interleave(repeat, 0)  # (B, count, H)
        t = self.tokens
        head = torch.tensor([t.mmu, *self._system, t.soi], device=self.device)
        tail = torch.tensor([t.eoi, *self._question], dtype=torch.long, device=self.device)
        rows, embed = image.shape[0], self.model.showo.model.embed_tokens
        parts = [embed(head).expand(rows, -1, -1), image, embed(tail).expand(rows, -1, -1)]
        if tokens is not None:
            parts.append(embed(tokens))
        embeds = torch.cat(parts, 1)
        p = len(head) + image.shape[1] + len(tail)
        mask = mmu_vit_attention_mask(rows, embeds.shape[1], len(head), image.shape[1], self.device)
        return self.model.hidden_states(None, mask, cache, inputs_embeds=embeds), p

    def _caption_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``bos``-less caption ids + eos: a leading space after a chat question; CLIP-ViT's captioning layout
        (no question) ends captions with a newline before eos, as its llava-pretrain data."""
        lead = " " if self._question else ""
        tail = "\n" if self.vision is not None and not self._question else ""
        seqs = [self._encode(lead + t.strip() + tail) + [self.tokens.eos] for t in texts]
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), self.tokens.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return tokens.to(self.device), mask.to(self.device)

    def _decode_caption(self, ids: list[int]) -> str:
        """Show-o's ``inference_mmu.py`` decodes with ``skip_special_tokens=True`` under transformers 4.41, whose
        phi-1_5 tokenizer then cleans up tokenization spaces (``clean_up_spaces``); transformers 5 skips that
        clean-up for BPE tokenizers, so we apply it ourselves. Leading/trailing spaces are stripped."""
        if ids and ids[-1] == self.tokens.eos:
            ids = ids[:-1]
        return clean_up_spaces(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()

    def _text_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text-column logits (..., V_text), full-vocabulary logits or None): the draw support, and the
        normaliser when ``caption_logp_vocab == "full"``."""
        if self.settings.caption_logp_vocab == "full":
            full = self.model.head(hidden)
            return full[..., : self.tokens.text_vocab_size], full
        return self.model.head(hidden, 0, self.tokens.text_vocab_size), None

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
        """KV-cached caption sampling (``temperature=0``: greedy); option ``max_tokens``."""
        from transformers import DynamicCache

        limit = int(options.get("max_tokens", self.settings.max_caption_tokens))
        eos, pad = self.tokens.eos, self.tokens.pad
        cache = DynamicCache(config=self.model.showo.config)
        hidden = self._und_hidden(images, num_samples, cache=cache)[0][:, -1]
        scale = float(temperature) or 1.0  # greedy captions are scored untempered

        def draw_from(hidden: torch.Tensor, temperature: float, generator: torch.Generator | None):
            text_logits, full = self._text_logits(hidden)
            choice, logp = draw(text_logits, temperature, generator)
            if full is not None:  # renormalise the chosen token's log-prob over the whole vocabulary
                logp = logp + torch.logsumexp(text_logits / scale, -1) - torch.logsumexp(full / scale, -1)
            return choice, logp

        def step(token: torch.Tensor) -> torch.Tensor:
            # one new row that may see every cached position: no mask needed
            return self.model.hidden_states(token, None, cache)[:, -1]

        tokens, logps, alive = caption_loop(hidden, step, draw_from, limit=limit, eos=eos, pad=pad,
                                            temperature=temperature, generator=generator)
        width = int(alive.sum(-1).max())
        texts = [self._decode_caption(row[alive[i]].tolist()) for i, row in enumerate(tokens)]
        if isinstance(images, ImageSamples):
            sources = images.select(torch.arange(len(images)).repeat_interleave(num_samples))
        elif isinstance(images, torch.Tensor):
            sources = images.repeat_interleave(num_samples, 0)
        else:
            sources = repeat_interleave(list(images), num_samples)
        return TextSamples(
            texts=texts,
            tokens=tokens[:, :width],
            logps=logps[:, :width],
            mask=alive[:, :width],
            images=sources,
            num_samples=num_samples,
            temperature=temperature,
        )

    def logp_text_given_image(
        self, texts: Sequence[str] | TextSamples, images: Sequence[Any] | ImageSamples, **options: Any
    ) -> TokenLogProbs:
        """Exact log p(caption tokens + eos | image), (B, T), one causal forward; option ``temperature``.

        ``TextSamples`` are scored on their ``tokens`` as sampled; strings are tokenised (plus eos).
        """
        if isinstance(texts, TextSamples):
            tokens, tmask = texts.tokens.to(self.device), texts.mask.to(self.device)
        else:
            tokens, tmask = self._caption_ids(list(texts))
        count = len(images) if not isinstance(images, torch.Tensor) else images.shape[0]
        assert count == tokens.shape[0], f"{count} images for {tokens.shape[0]} texts"
        hidden, p = self._und_hidden(images, 1, torch.where(tmask, tokens, self.tokens.pad))
        hidden = hidden[:, p - 1 : p - 1 + tokens.shape[1]]
        text_logits, full = self._text_logits(hidden)
        logits = text_logits if full is None else full
        temperature = float(options.get("temperature", 1.0) or 1.0)
        values = _gather_logps(logits / temperature, torch.where(tmask, tokens, 0)) * tmask
        return TokenLogProbs(values, tmask)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Show-o weights in showlab's layout at ``path`` (config.json + pytorch_model.safetensors), the VQ
        model in ``path/magvitv2``, the tokenizer in ``path/tokenizer`` and the settings in
        ``suder_show_o.json``."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.vq.save_pretrained(path / VQ_FOLDER)
        self.tokenizer.save_pretrained(str(path / TOKENIZER_FOLDER))
        if self.vision is not None:
            self.vision.save_pretrained(str(path / CLIP_FOLDER))
        (path / SETTINGS_FILE).write_text(json.dumps({"backbone": "show-o", **asdict(self.settings)}, indent=2))


def _perturbation_generator(options: dict[str, Any]) -> torch.Generator | None:
    """The generator of the estimator's random perturbations: ``generator=``, else one seeded by
    ``remask_seed=``, else None."""
    if options.get("generator") is not None:
        return options["generator"]
    if options.get("remask_seed") is not None:
        return torch.Generator().manual_seed(int(options["remask_seed"]))
    return None


def clean_up_spaces(text: str) -> str:
    """transformers 4.x's ``clean_up_tokenization``: drop the space before . ? ! , and English contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _gather_logps(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index] without materialising the log-softmax (TRL's selective_log_softmax)."""
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, index)
