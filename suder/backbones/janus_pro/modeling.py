"""``JanusProBackbone``: the ``UnifiedLMM`` adapter over transformers' ``JanusForConditionalGeneration``.

Built by ``backbone.build_janus_pro``; transformers is imported only inside methods. Janus-Pro (Chen et al.
2025, arXiv:2501.17811) decouples visual encoding: captions read SigLIP features (``vision_model`` +
``aligner``), images are drawn as 576 VQ codes (``generation_embeddings`` + ``generation_aligner`` in,
``generation_head`` out), and one Llama (``language_model``) serves both (transformers 5.24).

Sequences, formatted the documented way (the processor's chat template with ``add_generation_prompt=True``):

- text-to-image: ``<bos><|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>``, then the image codes;
  left-padded. The unconditional prompt of classifier-free guidance keeps BOS and BOI and turns every other
  token into pad, with the same attention mask (as transformers' ``generate(generation_mode="image")`` and the
  original Janus do). Guidance is ``uncond + s * (cond - uncond)`` on raw logits (Ho & Salimans 2022, eq. 6),
  cond and uncond rows in one batch.
- captioning: the processor's text-mode prompt (with the default system prompt when the checkpoint sets it),
  ``<|User|>: <image_placeholder>\\n{instruction}\\n\\n<|Assistant|>:`` with the image's SigLIP features in
  the placeholders, then the caption and the end-of-sentence token, right-padded. The image placeholder, BOI
  and EOI ids are suppressed (``-inf``) when sampling *and* when scoring captions, so the two agree (a sampled
  placeholder id inside a caption would otherwise make transformers' forward look for image features there).

Why not ``model.generate``: image mode adds a hidden ``top_k=50`` whenever none is set, takes no
``generator`` (only the global seed), crashes without CFG (``guidance_scale <= 1``) and returns no per-step
scores (``.scores`` is the last step's raw logits); text mode takes no ``generator`` either. The samplers
(``sampling``) follow HF's image loop otherwise, sample from the full softmax, and record per-token log-probs
equal to the teacher-forced ones (tested to 1e-4 in float32; in bfloat16 they drift apart, see ``ImageSamples.logps``).
Temperature 0 is greedy in both directions and in every sampler: the arg-max code after guidance, the
arg-max caption token, with the chosen tokens' log-probs under the temperature-1 distribution of the same
(CFG) policy, which is what the log-prob methods return at temperature 0 too. Positions are
``cumsum(mask) - 1`` everywhere. Image samplers are looked up by name (``sampling.IMAGE_SAMPLERS``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import BackboneError, closest
from ...protocol import ImageSamples, TextSamples, TokenLogProbs, repeat_interleave, texts_of
from ...sampling import caption_loop, rows_of
from .sampling import IMAGE_SAMPLERS, draw, image_logits, log_softmax_at, scoring_temperature

SETTINGS_FILE = "suder_janus.json"  # backbone settings written beside the weights by ``save_pretrained``
ADAPTER_DIR = "adapter"  # LoRA adapter (peft format) written beside the base weights
DEFAULT_INSTRUCTION = "Describe this image."
# LoRA on every attention and MLP projection of the shared language model (both directions train it).
DEFAULT_LORA: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,  # dropout would break GRPO's first ratio == 1 and SimPO's paired comparison
    "target_modules": r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
}
REFERENCE_ADAPTER = "reference"  # JanusProLora.snapshot_reference: a frozen copy of the adapter


# ------------------------------------------------------------------------------------------- the adapter
class JanusProBackbone(nn.Module):
    """Janus-Pro as a ``UnifiedLMM``. ``.model``: the ``JanusForConditionalGeneration``; ``.processor``: its
    ``JanusProcessor``.

    Settings: ``guidance_scale`` (5.0, Janus-Pro's default; 1 turns guidance off), ``cfg_policy``
    (``"guided"``: image log-probs score the guided distribution the sampler draws from; ``"cond"``: the
    conditional model), ``caption_instruction``, ``max_caption_tokens`` (256), ``freeze_vision_encoder``
    (True: SigLIP is not trained), ``image_sampler`` (``"fast"``; ``"reference"`` is the plain loop it is
    tested against, see ``IMAGE_SAMPLERS``), ``decode_batch_size`` (VQ decoding),
    ``sample_batch_size`` (samples per sampler call, bounding the KV cache; default all at once).
    """

    name = "janus-pro"
    row_generators = True  # samplers take one generator per row (``suder.sampling.Generators``)

    def __init__(self, model: nn.Module, processor: Any, *, guidance_scale: float = 5.0,
                 cfg_policy: str = "guided", caption_instruction: str = DEFAULT_INSTRUCTION,
                 max_caption_tokens: int = 256, freeze_vision_encoder: bool = True,
                 image_sampler: str = "fast", decode_batch_size: int = 8,
                 sample_batch_size: int | None = None):
        super().__init__()
        if cfg_policy not in ("cond", "guided"):
            raise BackboneError(f"cfg_policy must be 'cond' or 'guided', got '{cfg_policy}'.")
        if image_sampler not in IMAGE_SAMPLERS:
            options = ", ".join(IMAGE_SAMPLERS)
            raise BackboneError(f"Unknown image_sampler '{image_sampler}'. Available: {options}.")
        self.model = model
        self.processor = processor
        self.guidance_scale = float(guidance_scale)
        self.cfg_policy = cfg_policy
        self.caption_instruction = caption_instruction
        self.max_caption_tokens = int(max_caption_tokens)
        self.freeze_vision_encoder = bool(freeze_vision_encoder)
        self.image_sampler = image_sampler
        self.decode_batch_size = int(decode_batch_size)
        self.sample_batch_size = int(sample_batch_size) if sample_batch_size else None
        self.num_image_tokens = int(model.config.vision_config.num_image_tokens)
        tok = processor.tokenizer
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.pad_id = model.config.text_config.pad_token_id if tok.pad_token_id is None else tok.pad_token_id
        self.boi_id = tok.convert_tokens_to_ids(processor.image_start_token)
        self.eoi_id = tok.convert_tokens_to_ids(processor.image_end_token)
        self.image_id = int(model.config.image_token_id)
        if tok.convert_tokens_to_ids(processor.image_token) != self.image_id:
            raise BackboneError(f"The processor's image token is not the model's image_token_id "
                                f"{self.image_id}; load both from one checkpoint.")
        if processor.num_image_tokens != self.num_image_tokens:
            raise BackboneError(f"The processor expands images to {processor.num_image_tokens} tokens but "
                                f"the model uses {self.num_image_tokens}; load both from one checkpoint.")
        self.suppressed_ids = [self.image_id, self.boi_id, self.eoi_id]
        # codes are discrete: the VQ model has no gradient (transformers leaves requires_grad on)
        model.model.vqmodel.requires_grad_(False)
        if self.freeze_vision_encoder:
            model.model.vision_model.requires_grad_(False)
        self.train(model.training)
        self._und_prompt: tuple[str, torch.Tensor] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, processor: Any, *, lora: dict[str, Any] | bool | None = None,
                   **settings: Any) -> JanusProBackbone:
        """Wrap an already-built model and processor; ``lora`` adds a peft LoRA adapter (``JanusProLora``)."""
        params = inspect.signature(JanusProBackbone.__init__).parameters.items()
        valid = [k for k, p in params if p.kind == p.KEYWORD_ONLY]
        for key in settings:
            if key not in valid:
                hint = closest(key, valid)
                guess = f" Did you mean '{hint}'?" if hint else ""
                raise BackboneError(f"Unknown janus-pro option '{key}'.{guess} Options: dtype, device, lora, "
                                    f"cache_dir, revision, attn_implementation, {', '.join(valid)}.")
        if lora:
            return JanusProLora(model, processor, lora=lora, **settings)
        return cls(model, processor, **settings)

    def settings(self) -> dict[str, Any]:
        names = ("guidance_scale", "cfg_policy", "caption_instruction", "max_caption_tokens",
                 "freeze_vision_encoder", "image_sampler", "decode_batch_size", "sample_batch_size")
        return {k: getattr(self, k) for k in names}

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def train(self, mode: bool = True) -> JanusProBackbone:
        """As ``nn.Module.train``, but the VQ model (and a frozen vision encoder) stay in eval mode (the VQ
        model sets eval in its ``__init__``, which ``model.train()`` would undo)."""
        super().train(mode)
        self.model.model.vqmodel.eval()
        if self.freeze_vision_encoder:
            self.model.model.vision_model.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing of the language model (non-reentrant: frozen inputs need no hooks)."""
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def trainable_parameters(self, direction: str) -> list[nn.Parameter]:
        """What each direction trains (the reference's freezing, section 7).

        Both: the language model's layers and final norm. ``gen``: + ``generation_embeddings``,
        ``generation_aligner``, ``generation_head``. ``und``: + ``lm_head``, ``aligner`` (+ ``vision_model``
        when ``freeze_vision_encoder=False``). Never: the VQ model, ``embed_tokens`` (kept fixed: in ``gen``
        it only embeds the prompt, and it is the largest table).
        """
        if direction not in ("gen", "und"):
            raise ValueError(f"direction must be 'gen' or 'und', got {direction!r}")
        m = self.model.model
        parts: list[nn.Module] = [m.language_model.layers, m.language_model.norm]
        if direction == "gen":
            parts += [m.generation_embeddings, m.generation_aligner, m.generation_head]
        else:
            parts += [self.model.lm_head, m.aligner]
            if not self.freeze_vision_encoder:
                parts.append(m.vision_model)
        seen: dict[int, nn.Parameter] = {}
        for part in parts:
            for p in part.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    # ------------------------------------------------------------------ prompts and images
    def t2i_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded text-to-image prompts ending in ``<begin_of_image>``: ids (B, L), mask (B, L)."""
        turns = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts]
        chats = [self.processor.apply_chat_template(t, add_generation_prompt=True) for t in turns]
        enc = self.processor(text=chats, generation_mode="image", padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def uncond_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The unconditional prompt: BOS and BOI kept, every other token pad (same mask as the cond row)."""
        keep = (ids == self.bos_id) | (ids == self.boi_id)
        return torch.where(keep, ids, torch.full_like(ids, self.pad_id))

    def und_prompt_ids(self) -> torch.Tensor:
        """(1, L) ids of the captioning prompt, with ``num_image_tokens`` image placeholders (cached)."""
        if self._und_prompt is None or self._und_prompt[0] != self.caption_instruction:
            content = [{"type": "image"}, {"type": "text", "text": self.caption_instruction}]
            chat = [{"role": "user", "content": content}]
            text = self.processor.apply_chat_template(chat, add_generation_prompt=True)
            # images only drive the placeholder expansion here; pixels come from ``pixel_values``
            size = self.processor.image_processor.size
            blank = _blank_image(size["height"], size["width"])
            ids = self.processor(text=[text], images=[blank], return_tensors="pt")["input_ids"]
            self._und_prompt = (self.caption_instruction, ids)
        return self._und_prompt[1].to(self.device)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, 3, S, S) pixels for the understanding encoder (resize, pad to square, normalise)."""
        pv = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.model.model.vision_model.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> (B, N) VQ codes (the understanding-direction reward scores real images by these).

        Identical image objects (a group's repeated input) are encoded once."""
        unique, index = _unique(list(images))
        ip = self.processor.image_processor
        pv = ip(images=unique, return_tensors="pt")["pixel_values"].float()
        if getattr(ip, "do_normalize", True):  # back to [0, 1], then the VQ model's [-1, 1]
            std, mean = (torch.tensor(v).view(1, -1, 1, 1) for v in (ip.image_std, ip.image_mean))
            pv = pv * std + mean
        pv = pv * 2 - 1
        vq = self.model.model.vqmodel
        side = vq.config.num_patches * 2 ** (len(vq.config.channel_multiplier) - 1)
        if pv.shape[-1] != side:
            pv = nn.functional.interpolate(pv, size=(side, side), mode="bicubic", align_corners=False)
        codes = vq.encode(pv.to(self.device, vq.dtype)).image_tokens
        return codes.view(pv.shape[0], -1)[index.to(codes.device)]

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor) -> list[Any]:
        """(B, N) codes -> B PIL images through the VQ decoder, in chunks of ``decode_batch_size``."""
        from PIL import Image

        out = []
        for chunk in tokens.split(max(1, self.decode_batch_size)):
            pixels = self.model.decode_image_tokens(chunk.to(self.device))  # (b, H, W, 3), about [-1, 1]
            arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            out += [Image.fromarray(a) for a in arrays]
        return out

    def _chunks(self, rows: list[Any]) -> list[list[Any]]:
        size = self.sample_batch_size or len(rows) or 1
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def image_tokens(self, images: Sequence[Any] | ImageSamples | torch.Tensor) -> torch.Tensor:
        if isinstance(images, ImageSamples):
            return images.tokens.to(self.device)
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        return self.encode_images(images)

    @staticmethod
    def pictures(images: Sequence[Any] | ImageSamples) -> list[Any]:
        """Images to read: sampled ones are decoded (once, cached on the ``ImageSamples``)."""
        return list(images.images) if isinstance(images, ImageSamples) else list(images)

    def _und_embeds(self, ids: torch.Tensor, prompt_len: int, pictures: list[Any]) -> torch.Tensor:
        """Token embeddings with each row's image features in its prompt's placeholders (never the caption's).

        Identical image objects (a group's repeated input) go through SigLIP once.
        """
        unique, index = _unique(pictures)
        features = self.model.model.get_image_features(self.pixel_values(unique)).pooler_output
        features = features[index.to(features.device)]
        embeds = self.model.get_input_embeddings()(ids)
        slots = torch.zeros_like(ids, dtype=torch.bool)
        slots[:, :prompt_len] = ids[:, :prompt_len] == self.image_id
        assert int(slots.sum()) == features.shape[0] * features.shape[1], (
            f"{int(slots.sum())} image placeholders for features {tuple(features.shape)}"
        )
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head logits in float32, image special tokens suppressed: (R, ..., H) -> (R, ..., V)."""
        logits = self.model.lm_head(hidden).float()
        ids = torch.tensor(self.suppressed_ids, device=logits.device)
        # in place: no second (R, T, V) copy (neither lm_head's nor float()'s backward reads this output)
        return logits.index_fill_(-1, ids, float("-inf"))

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def caption_tokens(self, texts: Sequence[str] | TextSamples) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) right-padded caption ids ending in EOS, and their mask; a ``TextSamples``' own tokens as is.

        A string caption is what the model writes after ``<|Assistant|>:``: a leading space, the text, EOS.
        """
        if isinstance(texts, TextSamples):
            return texts.tokens.to(self.device), texts.mask.to(self.device)
        tok = self.processor.tokenizer
        seqs = [tok(" " + t.strip(), add_special_tokens=False)["input_ids"] + [self.eos_id] for t in texts]
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return tokens.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ text -> image
    def _t2i_batch(self, prompts: list[str], guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.t2i_inputs(prompts)
        if guided:
            ids, mask = torch.cat([ids, self.uncond_ids(ids)]), torch.cat([mask, mask])
        return ids, mask

    @torch.no_grad()
    def sample_image(self, prompts: Sequence[str], *, num_samples: int = 1,
                     generator: torch.Generator | None = None, guidance_scale: float | None = None,
                     temperature: float = 1.0, **options: Any) -> ImageSamples:
        """``num_samples`` images per prompt, ``num_image_tokens`` codes each, with per-token log-probs under
        the guided distribution (scale != 1) at ``temperature`` (0: greedy, log-probs at temperature 1);
        ``sampler=`` picks an ``IMAGE_SAMPLERS``."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        sampler = options.get("sampler", self.image_sampler)
        if sampler not in IMAGE_SAMPLERS:
            raise BackboneError(f"Unknown image sampler '{sampler}'. Available: {', '.join(IMAGE_SAMPLERS)}.")
        rows = repeat_interleave(list(prompts), num_samples)
        guided = scale != 1.0
        parts, start = [], 0
        for chunk in self._chunks(rows):  # ``sample_batch_size`` rows (KV cache memory) per sampler call
            ids, mask = self._t2i_batch(chunk, guided)
            parts.append(IMAGE_SAMPLERS[sampler](
                self.model, self.model.get_input_embeddings()(ids), mask, num_tokens=self.num_image_tokens,
                guidance_scale=scale if guided else None, temperature=temperature,
                generator=rows_of(generator, start, start + len(chunk))))
            start += len(chunk)
        tokens, logps = (torch.cat(t) for t in zip(*parts, strict=True))
        return ImageSamples(prompts=rows, tokens=tokens, logps=logps, num_samples=num_samples,
                            guidance_scale=scale, temperature=temperature, decode=self.decode_images)

    def logp_image_given_text(self, images: Sequence[Any] | ImageSamples, texts: Sequence[str] | TextSamples,
                              **options: Any) -> TokenLogProbs:
        """log p(image codes | text): (B, N), one teacher-forced forward (prompt embeddings, then the codes
        shifted by one through generation embeddings + aligner; generation head from ``<begin_of_image>`` on).

        ``policy``: ``"guided"`` scores ``uncond + s (cond - uncond)``, cond and uncond rows in one batch;
        ``"cond"`` the conditional model (default: the backbone's ``cfg_policy``). ``guidance_scale`` (default
        the backbone's) and ``temperature`` match the sampler's. PIL images are VQ-encoded first.
        """
        prompts = texts_of(texts)
        codes = self.image_tokens(images)
        N = self.num_image_tokens
        assert codes.shape == (len(prompts), N), f"codes {tuple(codes.shape)} for {len(prompts)} texts"
        scale = options.get("guidance_scale")
        scale = self.guidance_scale if scale is None else float(scale)
        policy = options.get("policy") or self.cfg_policy
        if policy not in ("cond", "guided"):
            raise ValueError(f"policy must be 'cond' or 'guided', got {policy!r}")
        guided = policy == "guided" and scale != 1.0
        ids, mask = self._t2i_batch(prompts, guided)
        feed = codes.repeat(2, 1) if guided else codes
        embeds = torch.cat([self.model.get_input_embeddings()(ids),
                            self.model.prepare_embeddings_for_image_generation(feed[:, :-1])], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], N - 1)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state[:, ids.shape[1] - 1 :]
        logits = image_logits(self.model, hidden, scale if guided else None)  # (B, N, V)
        values = log_softmax_at(logits, codes, scoring_temperature(options))
        return TokenLogProbs(values, torch.ones_like(values, dtype=torch.bool))

    # ------------------------------------------------------------------ image -> text
    @torch.no_grad()
    def sample_text(self, images: Sequence[Any] | ImageSamples, *, num_samples: int = 1,
                    generator: torch.Generator | None = None, temperature: float = 1.0,
                    **options: Any) -> TextSamples:
        """``num_samples`` captions per image (``temperature=0``: greedy), KV-cached, at most
        ``max_new_tokens`` (default ``max_caption_tokens``) tokens, image special tokens suppressed, per-token
        log-probs recorded."""
        pictures = repeat_interleave(self.pictures(images), num_samples)
        limit = int(options.get("max_new_tokens", options.get("max_tokens", self.max_caption_tokens)))
        chunks = self._chunks(pictures)
        starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        parts = [self._sample_captions(r, limit, temperature, rows_of(generator, s, s + len(r)))
                 for r, s in zip(chunks, starts, strict=True)]
        width = max(int(part[2].sum(-1).max()) for part in parts) or 1
        tokens, logps, alive = (torch.cat([p[i][:, :width] for p in parts]) for i in range(3))
        texts = [self.decode_text(row[keep & (row != self.eos_id)].tolist())
                 for row, keep in zip(tokens, alive, strict=True)]
        return TextSamples(texts=texts, tokens=tokens, logps=logps, mask=alive, images=pictures,
                           num_samples=num_samples, temperature=temperature)

    def _sample_captions(self, pictures: list[Any], limit: int, temperature: float,
                         generator: torch.Generator | None):
        """The caption loop: (tokens, logps, alive), each (n, limit), right-padded; rows stop at EOS."""
        from transformers import DynamicCache

        prompt = self.und_prompt_ids()
        n, L = len(pictures), prompt.shape[1]
        mask = torch.ones(n, L, dtype=torch.long, device=self.device)
        position = (mask.cumsum(-1) - 1)[:, -1:]
        lm = self.model.model.language_model
        cache = DynamicCache(config=lm.config)
        embeds = self._und_embeds(prompt.expand(n, -1), L, pictures)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1, cache=cache,
                 use_cache=True)

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal mask, position
            mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
            position = position + 1
            out = lm(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
            return self._text_logits(out.last_hidden_state[:, -1])

        return caption_loop(self._text_logits(out.last_hidden_state[:, -1]), step, draw, limit=limit,
                            eos=self.eos_id, pad=self.pad_id, temperature=temperature, generator=generator)

    def logp_text_given_image(self, texts: Sequence[str] | TextSamples, images: Sequence[Any] | ImageSamples,
                              **options: Any) -> TokenLogProbs:
        """log p(caption tokens + EOS | image): (B, T), one teacher-forced forward on the understanding path.

        Strings are tokenized as the model writes them (``caption_tokens``); a ``TextSamples``' own tokens are
        scored as they are, so the result equals its ``.logps`` (same ``temperature``). Sampled images are
        decoded (once, cached on the ``ImageSamples``).
        """
        tokens, tmask = self.caption_tokens(texts)
        pictures = self.pictures(images)
        assert len(pictures) == tokens.shape[0], f"{len(pictures)} images for {tokens.shape[0]} texts"
        prompt = self.und_prompt_ids()
        n, L, T = tokens.shape[0], prompt.shape[1], tokens.shape[1]
        ids = torch.cat([prompt.expand(n, -1), tokens], 1)
        mask = torch.cat([torch.ones(n, L, dtype=torch.long, device=self.device), tmask.long()], 1)
        embeds = self._und_embeds(ids, L, pictures)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state[:, L - 1 : L - 1 + T]
        values = log_softmax_at(self._text_logits(hidden), tokens, scoring_temperature(options))
        return TokenLogProbs(values.masked_fill(~tmask, 0.0), tmask)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The transformers model, the processor and ``suder_janus.json`` (settings), so that
        ``load_backbone("janus-pro", model=path)`` (or plain transformers ``from_pretrained``) reloads it."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self._save_processor_and_settings(os.fspath(path), self.settings())

    def _save_processor_and_settings(self, path: str, settings: dict[str, Any]) -> None:
        self.processor.save_pretrained(path)
        with open(os.path.join(path, SETTINGS_FILE), "w") as f:
            json.dump({"backbone": self.name, **settings}, f, indent=2)


def _unique(items: list[Any]) -> tuple[list[Any], torch.Tensor]:
    """Distinct objects (by identity, first-seen order) and each item's index among them: (U,), (B,) long."""
    first: dict[int, int] = {}
    index = torch.tensor([first.setdefault(id(x), len(first)) for x in items], dtype=torch.long)
    return list({id(x): x for x in items}.values()), index


def _blank_image(height: int, width: int):
    from PIL import Image

    return Image.new("RGB", (width, height))


class JanusProLora(JanusProBackbone):
    """Janus-Pro with a peft LoRA adapter on the language model; the reference policy is the adapter
    disabled (``reference_scope()``), so no second copy of the weights is kept; after ``snapshot_reference()``
    it is a frozen copy of the adapter as it was then (a second adapter, ``REFERENCE_ADAPTER``).

    ``lora``: ``True`` for ``DEFAULT_LORA`` (r 16, alpha 32, every attention/MLP projection of the language
    model), or a dict of ``peft.LoraConfig`` fields overriding it. Adapter weights are float32 whatever the
    model's dtype. Saved folders hold the base weights plus ``adapter/`` (peft format; loads back with the
    adapter on), or merged weights with ``save_pretrained(path, merge_lora=True)``.
    """

    def __init__(self, model: nn.Module, processor: Any, *, lora: dict[str, Any] | bool = True,
                 **settings: Any):
        from peft import LoraConfig, inject_adapter_in_model

        options = {**DEFAULT_LORA, **(lora if isinstance(lora, dict) else {})}
        try:
            inject_adapter_in_model(LoraConfig(**options), model)
        except (TypeError, ValueError) as exc:
            raise BackboneError(f"Invalid LoRA options {lora}: {exc}") from exc
        for name, p in model.named_parameters():
            if "lora_" in name:  # float32 adapters on a bf16 model, as peft's autocast_adapter_dtype does
                p.data = p.data.float()
        super().__init__(model, processor, **settings)
        self.lora_options = options

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "lora": self.lora_options}

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trained adapter's weights (not the frozen reference copy)."""
        return [p for name, p in self.model.named_parameters() if "lora_" in name and ".default." in name]

    def snapshot_reference(self) -> None:
        """Make the adapter as it is now the reference policy of ``reference_scope()``: the trainer calls this at
        the start, so that a run from a previous LoRA run's folder scores with its initial model (the loaded
        adapter on), not with the base under it. Nothing to copy while the adapter is still at its
        initialisation (every ``lora_B`` zero): the adapter switched off is that same model."""
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        if REFERENCE_ADAPTER in self.model.peft_config:
            raise BackboneError("snapshot_reference() was already called on this model.")
        if all(not p.any() for name, p in self.model.named_parameters() if "lora_B" in name):
            return
        with warnings.catch_warnings():  # "Already found a peft_config attribute ... multiple adapters": on purpose
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(LoraConfig(**self.lora_options), self.model, adapter_name=REFERENCE_ADAPTER)
        with torch.no_grad():
            for layer in (m for m in self.model.modules() if isinstance(m, LoraLayer)):
                for part in (layer.lora_A, layer.lora_B):
                    part[REFERENCE_ADAPTER].weight.data = part["default"].weight.detach().clone()
                    part[REFERENCE_ADAPTER].requires_grad_(False)
                layer.set_adapter("default")  # peft makes the new adapter active and trainable; the trainer's stays
        for p in self.lora_parameters():
            p.requires_grad_(True)

    def trainable_parameters(self, direction: str) -> list[nn.Parameter]:
        """Both directions train the adapter only."""
        if direction not in ("gen", "und"):
            raise ValueError(f"direction must be 'gen' or 'und', got {direction!r}")
        return self.lora_parameters()

    @contextlib.contextmanager
    def reference_scope(self):
        """Under this context every method computes the reference policy: the base model (adapter off), or after
        ``snapshot_reference()`` the adapter as it was then."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        flags = [(p, p.requires_grad) for name, p in self.model.named_parameters() if "lora_" in name]
        snapshot = REFERENCE_ADAPTER in self.model.peft_config
        for layer in layers:
            if snapshot:
                layer.set_adapter(REFERENCE_ADAPTER)
            else:
                layer.enable_adapters(False)
        try:
            yield self
        finally:
            for layer in layers:
                if snapshot:
                    layer.set_adapter("default")
                else:
                    layer.enable_adapters(True)
            for p, flag in flags:  # peft toggles requires_grad; the trainer's choice stands
                p.requires_grad_(flag)

    def _base_state_dict(self, merge: bool) -> dict[str, torch.Tensor]:
        """Plain transformers keys: adapter tensors dropped, ``base_layer`` unwrapped; merged: W + s B A."""
        from peft.tuners.lora import LoraLayer

        state = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and merge:
                base = module.get_base_layer()
                delta = module.get_delta_weight("default")
                state[f"{name}.weight"] = (base.weight.float() + delta.float()).to(base.weight.dtype)
        for key, value in self.model.state_dict().items():
            if "lora_" in key:  # the adapters (trained and reference) go to adapter/
                continue
            key = key.replace(".base_layer.", ".")
            state.setdefault(key, value)
        return state

    def save_pretrained(self, path: str | os.PathLike, merge_lora: bool = False) -> None:
        """Base weights + ``adapter/`` in peft format (default: reloads with the adapter on and the base as
        the reference), or ``merge_lora=True``: merged weights and no adapter, a plain Janus-Pro checkpoint of
        the trained model."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, state_dict=self._base_state_dict(merge_lora))
        settings = self.settings()
        if merge_lora:
            settings.pop("lora")
        self._save_processor_and_settings(path, settings)
        if merge_lora:
            return
        adapter = os.path.join(path, ADAPTER_DIR)
        os.makedirs(adapter, exist_ok=True)
        self.model.peft_config["default"].save_pretrained(adapter)
        weights = get_peft_model_state_dict(self.model)
        # ``base_model.model.`` is the prefix of PeftModel checkpoints: the folder loads with PeftModel too
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.items()},
                  os.path.join(adapter, "adapter_model.safetensors"))

    def load_adapter(self, path: str) -> None:
        """Load adapter weights written by ``save_pretrained`` (or by a peft ``PeftModel``)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(file):
            raise BackboneError(f"No LoRA adapter weights at '{file}'.")
        weights = {k.removeprefix("base_model.model."): v for k, v in load_file(file).items()}
        result = set_peft_model_state_dict(self.model, weights)
        wrong = [k for k in [*result.missing_keys, *result.unexpected_keys] if "lora_" in k]
        if wrong:
            raise BackboneError(f"The LoRA adapter at '{path}' does not match this model (e.g. {wrong[0]}).")
