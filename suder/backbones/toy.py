"""The ``toy`` backbone: a tiny unified model for ShapesWorld, and the reference ``UnifiedLMM``.

One decoder-only transformer (transformers' ``LlamaForCausalLM``, ~1M parameters) over one vocabulary::

    ids 0..6      special tokens  <pad> <bos> <eos> <t2i> <i2t> <boi> <eoi>
    ids 7..30     the 24 ShapesWorld grammar words (``suder.worlds.shapes.VOCAB_WORDS``)
    ids 31..      image codes: one per distinct 4x4 patch of the world

Sequences:

- text-to-image: ``<bos> <t2i> words <boi> c_1 .. c_64``, left-padded; the unconditional prompt (classifier-free
  guidance, and the empty prompt ``""``) is ``<bos> <t2i> <boi>``. Position ids are the cumulative attention mask.
- captioning: ``<bos> <i2t> <boi> c_1 .. c_64 <eoi> words <eos>``, right-padded.

Sampling is restricted: image positions may only produce codes, text positions only words or ``<eos>``; the
log-probs of both samplers and both teacher-forced methods are renormalised over the same restricted set, so the
``.logps`` recorded while sampling equal the teacher-forced ones (tested). Temperature 0 is greedy in both
directions and both image samplers; its ``.logps`` (and the log-prob methods at ``temperature=0``) are under the
untempered policy. Images are tokenised by ``PatchTokenizer``: a 32x32 image is an 8x8 grid of 4x4 patches, each
mapped to the nearest codebook patch; the codebook holds every patch the world can draw, so encoding is lossless on
ShapesWorld.

Third-party authors: this file is the reference implementation of the protocol; a real backbone replaces the
vocabulary and sequence layout but keeps the method contracts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BackboneError, DataError
from ..hookspecs import hookimpl
from ..protocol import ImageSamples, TextSamples, TokenLogProbs, repeat_interleave
from ..sampling import caption_loop, left_pad, multinomial_rows, right_pad

SPECIALS = ("<pad>", "<bos>", "<eos>", "<t2i>", "<i2t>", "<boi>", "<eoi>")
PAD, BOS, EOS, T2I, I2T, BOI, EOI = range(len(SPECIALS))
PATCH = 4
GRID = 8
NUM_IMAGE_TOKENS = GRID * GRID


# --------------------------------------------------------------------------------------------- tokenizer
def _patches(array: np.ndarray) -> np.ndarray:
    """(32, 32, 3) uint8 -> (64, 48) patches in raster order."""
    a = array.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4)
    return a.reshape(GRID * GRID, PATCH * PATCH * 3)


def build_codebook() -> np.ndarray:
    """Every 4x4 patch ShapesWorld can draw, sorted bytewise: (K, 48) uint8.

    Objects sit inside their 16x16 quadrant and quadrants are patch-aligned, so the patches of each of the
    18 objects drawn in quadrant 0, plus the empty patch, are all the patches any scene has.
    """
    from ..worlds import shapes

    found = {bytes(48)}
    for color in shapes.COLORS:
        for shape in shapes.SHAPES:
            scene = shapes.Scene.from_items({0: shapes.Obj(color, shape)})
            for p in _patches(shapes.render_array(scene)):
                found.add(p.tobytes())
    return np.stack([np.frombuffer(b, dtype=np.uint8) for b in sorted(found)])


class PatchTokenizer:
    """Exact patch tokenizer: image <-> 64 codes. Nearest code (Euclidean RGB) for patches off the world."""

    def __init__(self, codebook: np.ndarray):
        self.codebook = np.asarray(codebook, dtype=np.uint8)
        self._exact = {p.tobytes(): i for i, p in enumerate(self.codebook)}
        self._float = torch.from_numpy(self.codebook.astype(np.float32))

    def __len__(self) -> int:
        return len(self.codebook)

    def encode(self, images: Sequence[Any]) -> torch.Tensor:
        """List of PIL images / (32, 32, 3) arrays -> (B, 64) long codes."""
        out = torch.empty(len(images), NUM_IMAGE_TOKENS, dtype=torch.long)
        for b, image in enumerate(images):
            array = _to_array(image)
            patches = _patches(array)
            codes = [self._exact.get(p.tobytes(), -1) for p in patches]
            if min(codes) < 0:  # off-world pixels: nearest code
                dist = torch.cdist(torch.from_numpy(patches.astype(np.float32)), self._float)
                codes = dist.argmin(-1).tolist()
            out[b] = torch.tensor(codes)
        return out

    def decode_arrays(self, codes: torch.Tensor) -> np.ndarray:
        """(B, 64) codes -> (B, 32, 32, 3) uint8."""
        p = self.codebook[codes.detach().cpu().numpy()]  # (B, 64, 48)
        p = p.reshape(-1, GRID, GRID, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
        return p.reshape(-1, GRID * PATCH, GRID * PATCH, 3)

    def decode(self, codes: torch.Tensor) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(a) for a in self.decode_arrays(codes)]


def _to_array(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        array = image
    else:
        try:
            array = np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise DataError(f"Cannot read image {image!r}: {exc}") from exc
    if array.shape != (GRID * PATCH, GRID * PATCH, 3):
        from PIL import Image

        array = np.asarray(Image.fromarray(array.astype(np.uint8)).convert("RGB").resize((32, 32), Image.NEAREST))
    return array.astype(np.uint8)


# --------------------------------------------------------------------------------------------- model
@dataclass
class ToyConfig:
    """Sizes of the toy transformer; the defaults are the 1.07M-parameter model of the prototype."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_caption_tokens: int = 16
    guidance_scale: float = 1.0  # the scale the model is used with; stored with every checkpoint
    words: list[str] = field(default_factory=list)
    num_codes: int = 0


class ToyUnifiedLM(nn.Module):
    """The reference ``UnifiedLMM``: a tiny Llama over words and image codes (see the module docstring)."""

    name = "toy"
    row_generators = True  # samplers take one generator per row (``suder.sampling.Generators``)

    def __init__(self, config: ToyConfig | None = None, codebook: np.ndarray | None = None):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..worlds import shapes

        config = config or ToyConfig()
        codebook = build_codebook() if codebook is None else codebook
        config.words = list(config.words or shapes.VOCAB_WORDS)
        config.num_codes = len(codebook)
        self.config = config
        self.tokenizer = PatchTokenizer(codebook)
        self.word_to_id = {w: len(SPECIALS) + i for i, w in enumerate(config.words)}
        self.id_to_word = {i: w for w, i in self.word_to_id.items()}
        self.code_offset = len(SPECIALS) + len(config.words)
        vocab = self.code_offset + config.num_codes
        self.lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=config.hidden_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                intermediate_size=config.intermediate_size,
                max_position_embeddings=128,
                tie_word_embeddings=True,
                pad_token_id=PAD,
                bos_token_id=BOS,
                eos_token_id=EOS,
                # eager attention: on CPU, SDPA with a padding mask is 4x slower at this size (benchmarks/)
                attn_implementation="eager",
            )
        )
        self.register_buffer("codebook", torch.from_numpy(np.asarray(codebook, dtype=np.uint8)), persistent=True)
        # restricted output sets: codes for image positions, words + <eos> for text positions
        self._code_ids = torch.arange(self.code_offset, vocab)
        self._text_ids = torch.tensor([EOS] + list(range(len(SPECIALS), self.code_offset)))

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    def trainable_parameters(self, direction: str) -> list[nn.Parameter]:
        """Both directions train the whole shared transformer."""
        return list(self.lm.parameters())

    def encode_text(self, text: str) -> list[int]:
        words = text.split()
        bad = [w for w in words if w not in self.word_to_id]
        if bad:
            raise DataError(f"The toy backbone cannot read {bad[0]!r} in {text!r}: it knows only ShapesWorld words.")
        return [self.word_to_id[w] for w in words]

    def decode_text(self, ids: Sequence[int]) -> str:
        return " ".join(self.id_to_word[i] for i in ids if i in self.id_to_word)

    def image_codes(self, images: Sequence[Any] | ImageSamples | torch.Tensor) -> torch.Tensor:
        """(B, 64) code indices (0-based in the codebook) for sampled images (tokens), tensors or PIL inputs."""
        if isinstance(images, ImageSamples):
            return images.tokens.to(self.device)
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        return self.tokenizer.encode(list(images)).to(self.device)

    def _restricted(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, ids.to(logits.device))

    def _t2i_prefix(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``<bos> <t2i> words <boi>``: ids (B, L) and attention mask (B, L)."""
        return left_pad([[BOS, T2I, *self.encode_text(p), BOI] for p in prompts], PAD, self.device)

    def _forward(self, ids, mask, cache=None, positions=None):
        if positions is None:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return self.lm(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None
        )

    def _guided(self, logits: torch.Tensor, scale: float) -> torch.Tensor:
        """Rows [cond; uncond] -> uncond + s * (cond - uncond) (Ho & Salimans 2022, eq. 6)."""
        cond, uncond = logits.chunk(2)
        return uncond + scale * (cond - uncond)

    # ------------------------------------------------------------------ text -> image
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
        """KV-cached sampling of 64 codes per image; cond and uncond rows share one batch when guided.

        ``sampler``: ``"fast"`` (default: a pre-allocated cache, ``suder.fast_sampling``) or ``"reference"``
        (a plain loop over transformers' forward); the same generator gives both the same codes and log-probs.
        """
        scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        sampler = options.get("sampler", "fast")
        if sampler not in IMAGE_SAMPLERS:
            raise BackboneError(f"Unknown image sampler '{sampler}'. Available: {', '.join(IMAGE_SAMPLERS)}.")
        rows = repeat_interleave(list(prompts), num_samples)
        guided = scale != 1.0
        ids, mask = self._t2i_prefix(rows + [""] * len(rows) if guided else rows)
        loop = getattr(self, IMAGE_SAMPLERS[sampler])
        tokens, logps = loop(ids, mask, scale if guided else None, temperature, generator)
        return ImageSamples(
            prompts=rows,
            tokens=tokens,
            logps=logps,
            num_samples=num_samples,
            guidance_scale=scale,
            temperature=temperature,
            decode=self.tokenizer.decode,
        )

    def _sample_codes_reference(self, ids, mask, scale, temperature, generator):
        """The reference loop: ``DynamicCache`` and one transformers forward per code. ``ids``, ``mask``: (R, L)
        prefixes, R = 2n rows ``[cond; uncond]`` when ``scale`` is set; returns codes and log-probs, (n, 64)."""
        from transformers import DynamicCache

        n = ids.shape[0] // 2 if scale is not None else ids.shape[0]
        cache = DynamicCache(config=self.lm.config)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = self._forward(ids, mask, cache, positions).logits[:, -1]
        tokens = torch.empty(n, NUM_IMAGE_TOKENS, dtype=torch.long, device=self.device)
        logps = torch.empty(n, NUM_IMAGE_TOKENS, device=self.device)
        next_pos = positions[:, -1:] + 1
        for t in range(NUM_IMAGE_TOKENS):
            step = self._restricted(logits, self._code_ids).float()
            if scale is not None:
                step = self._guided(step, scale)
            code, logp = _sample(step, temperature, generator)
            tokens[:, t], logps[:, t] = code, logp
            if t + 1 == NUM_IMAGE_TOKENS:
                break
            feed = (code + self.code_offset)[:, None]
            if scale is not None:
                feed = feed.repeat(2, 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            logits = self._forward(feed, mask, cache, next_pos).logits[:, -1]
            next_pos = next_pos + 1
        return tokens, logps

    def _sample_codes_fast(self, ids, mask, scale, temperature, generator):
        """The reference loop's codes and log-probs on a pre-allocated cache (``suder.fast_sampling``).

        Besides the decoder, one change: logits are computed for the codes only (the code rows of the tied
        output matrix, sliced once per call), not for the whole vocabulary and then restricted.
        """
        from ..fast_sampling import StaticDecoder

        n = ids.shape[0] // 2 if scale is not None else ids.shape[0]
        body = self.lm.model
        decoder = StaticDecoder(body, body.embed_tokens(ids), mask, NUM_IMAGE_TOKENS - 1)
        head = self.lm.lm_head.weight.index_select(0, self._code_ids.to(self.device))  # (K, H)
        tokens = torch.empty(n, NUM_IMAGE_TOKENS, dtype=torch.long, device=self.device)
        logps = torch.empty(n, NUM_IMAGE_TOKENS, device=self.device)
        start = decoder.prompt_length
        for t in range(NUM_IMAGE_TOKENS):
            step = nn.functional.linear(decoder.hidden, head).float()
            if scale is not None:
                step = self._guided(step, scale)
            code, logp = _sample(step, temperature, generator)
            tokens[:, t], logps[:, t] = code, logp
            if t + 1 == NUM_IMAGE_TOKENS:
                break
            feed = code + self.code_offset
            if scale is not None:
                feed = feed.repeat(2)
            decoder.step(body.embed_tokens(feed)[:, None], start + t + 1)
        return tokens, logps

    def logp_image_given_text(
        self, images: Sequence[Any] | ImageSamples, texts: Sequence[str] | TextSamples, **options: Any
    ) -> TokenLogProbs:
        """log p(64 codes | text), (B, 64), from one teacher-forced forward.

        ``policy``: ``"cond"`` scores the conditional model; ``"guided"`` (default when the guidance scale is not
        1) scores the CFG-guided distribution ``uncond + s (cond - uncond)`` that the sampler draws from, with
        cond and uncond rows in one batch. ``temperature`` matches a sampling temperature.
        """
        prompts = list(texts.texts) if isinstance(texts, TextSamples) else list(texts)
        codes = self.image_codes(images)
        assert codes.shape == (len(prompts), NUM_IMAGE_TOKENS), f"codes {tuple(codes.shape)}, {len(prompts)} texts"
        scale = float(options.get("guidance_scale", self.config.guidance_scale))
        policy = options.get("policy", "guided")
        guided = policy == "guided" and scale != 1.0
        if policy not in ("cond", "guided"):
            raise ValueError(f"policy must be 'cond' or 'guided', got {policy!r}")
        rows = prompts + [""] * len(prompts) if guided else prompts
        ids, mask = self._t2i_prefix(rows)
        all_codes = codes.repeat(2, 1) if guided else codes
        ids = torch.cat([ids, all_codes + self.code_offset], 1)
        mask = torch.cat([mask, torch.ones_like(all_codes)], 1)
        logits = self._forward(ids, mask).logits[:, -NUM_IMAGE_TOKENS - 1 : -1]
        step = self._restricted(logits, self._code_ids).float()
        if guided:
            step = self._guided(step, scale)
        step = step / _scoring_temperature(options.get("temperature", 1.0))
        values = torch.log_softmax(step, -1).gather(-1, codes[..., None]).squeeze(-1)
        return TokenLogProbs(values, torch.ones_like(values, dtype=torch.bool))

    # ------------------------------------------------------------------ image -> text
    def _i2t_prefix(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        head = torch.tensor([BOS, I2T, BOI], device=self.device).expand(b, 3)
        tail = torch.full((b, 1), EOI, device=self.device)
        return torch.cat([head, codes + self.code_offset, tail], 1)

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
        """KV-cached caption sampling (``temperature=0``: greedy), at most ``max_caption_tokens`` tokens."""
        codes = self.image_codes(images).repeat_interleave(num_samples, 0)
        ids = self._i2t_prefix(codes)
        n, limit = ids.shape[0], int(options.get("max_tokens", self.config.max_caption_tokens))
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        mask = torch.ones_like(ids)
        text_ids = self._text_ids.to(self.device)

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal mask
            mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
            logits = self._forward(token, mask, cache, mask.sum(-1, keepdim=True) - 1).logits[:, -1]
            return self._restricted(logits, text_ids).float()

        first = self._restricted(self._forward(ids, mask, cache).logits[:, -1], text_ids).float()
        tokens, logps, alive = caption_loop(first, step, _sample, limit=limit, eos=EOS, pad=PAD,
                                            temperature=temperature, generator=generator,
                                            token_of=lambda choice: text_ids[choice])
        width = int(alive.sum(-1).max())
        texts = [self.decode_text(row[alive[i]].tolist()) for i, row in enumerate(tokens)]
        sources = images.images if isinstance(images, ImageSamples) and images._images is not None else images
        return TextSamples(
            texts=texts,
            tokens=tokens[:, :width],
            logps=logps[:, :width],
            mask=alive[:, :width],
            images=None if isinstance(sources, ImageSamples) else repeat_interleave(list(sources), num_samples),
            num_samples=num_samples,
            temperature=temperature,
        )

    def _caption_tokens(self, texts: Sequence[str] | TextSamples) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, TextSamples):
            return texts.tokens.to(self.device), texts.mask.to(self.device)
        return right_pad([self.encode_text(t) + [EOS] for t in texts], PAD, self.device)

    def logp_text_given_image(
        self, texts: Sequence[str] | TextSamples, images: Sequence[Any] | ImageSamples, **options: Any
    ) -> TokenLogProbs:
        """log p(caption words + <eos> | image), (B, T), from one teacher-forced forward (right-padded)."""
        tokens, tmask = self._caption_tokens(texts)
        codes = self.image_codes(images)
        assert codes.shape[0] == tokens.shape[0], f"{codes.shape[0]} images for {tokens.shape[0]} texts"
        prefix = self._i2t_prefix(codes)
        ids = torch.cat([prefix, tokens], 1)
        mask = torch.cat([torch.ones_like(prefix), tmask.long()], 1)
        logits = self._forward(ids, mask).logits[:, prefix.shape[1] - 1 : -1]
        step = self._restricted(logits, self._text_ids).float() / _scoring_temperature(options.get("temperature", 1.0))
        # position of each target token inside the restricted set (words + <eos>)
        lookup = torch.full((self.code_offset,), 0, dtype=torch.long, device=self.device)
        lookup[self._text_ids.to(self.device)] = torch.arange(len(self._text_ids), device=self.device)
        values = torch.log_softmax(step, -1).gather(-1, lookup[tokens.clamp_max(self.code_offset - 1)][..., None])
        values = values.squeeze(-1) * tmask
        return TokenLogProbs(values, tmask)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``config.json`` (sizes, vocabulary, guidance scale) and ``model.safetensors`` (weights + codebook)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"backbone": "toy", **asdict(self.config)}, f, indent=2)
        # tied weights (lm_head = embed_tokens) once, as copies: DeepSpeed ZeRO leaves parameters as views into one
        # flat buffer, which safetensors' save_model refuses ("none is covering the entire storage")
        tensors, seen = {}, set()
        for name, value in self.state_dict(keep_vars=True).items():
            if id(value) not in seen:
                seen.add(id(value))
                tensors[name] = value.detach().clone().contiguous()
        save_file(tensors, os.path.join(path, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | None = None) -> ToyUnifiedLM:
        from safetensors.torch import load_file, load_model

        cfg_path = os.path.join(path, "config.json")
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(cfg_path) or not os.path.isfile(weights):
            raise BackboneError(
                f"No toy model at '{path}' (expected config.json and model.safetensors); "
                "create one with `suder pretrain --backbone toy --out DIR`."
            )
        with open(cfg_path) as f:
            raw = json.load(f)
        raw.pop("backbone", None)
        known = {k: v for k, v in raw.items() if k in ToyConfig.__dataclass_fields__}
        codebook = load_file(weights)["codebook"].numpy()
        model = cls(ToyConfig(**known), codebook=codebook)
        load_model(model, weights)
        return model.to(device) if device else model


IMAGE_SAMPLERS = {"fast": "_sample_codes_fast", "reference": "_sample_codes_reference"}  # name -> loop method


def _scoring_temperature(temperature: float) -> float:
    """The temperature the log-prob methods divide by: 0 (greedy) scores under the untempered policy, as the
    greedy samplers record it (``suder.testing.check_temperature_zero_is_greedy``)."""
    t = float(temperature)
    if t < 0:
        raise BackboneError(f"temperature must be >= 0 (0 is greedy), got {t}.")
    return 1.0 if t == 0 else t


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """Draw one index per row of (B, V) logits; return (index (B,), log-prob of it under the sampling policy).

    ``temperature=0`` is greedy: the arg-max, with its log-prob under the untempered (temperature 1) policy."""
    if temperature < 0:
        raise BackboneError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if temperature == 0:
        choice = logits.argmax(-1)
        return choice, torch.log_softmax(logits, -1).gather(-1, choice[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    choice = multinomial_rows(probs, generator)  # one generator, or one per row
    return choice.squeeze(-1), logp.gather(-1, choice).squeeze(-1)


def build_toy(model: str | None = None, device: str | None = None, **config: Any) -> ToyUnifiedLM:
    """Factory: ``load_backbone("toy")`` builds a fresh random model; ``model=PATH`` loads a saved one."""
    if model is not None:
        if config:
            raise BackboneError(f"Options {sorted(config)} apply to a new toy model, not to one loaded from '{model}'.")
        return ToyUnifiedLM.from_pretrained(model, device=device)
    unknown = set(config) - set(ToyConfig.__dataclass_fields__)
    if unknown:
        raise BackboneError(
            f"Unknown toy option(s) {sorted(unknown)}; valid: {', '.join(sorted(ToyConfig.__dataclass_fields__))}."
        )
    built = ToyUnifiedLM(ToyConfig(**config))
    return built.to(device) if device else built


def shapes_recipe():
    """The toy's ShapesWorld recipe: its factory builds a ShapesWorld model by default, pre-trained with
    ``suder.pretrain.PRETRAIN_DEFAULTS``; ``suder/presets/toy.yaml`` holds its run defaults, ``suder/bases/toy``
    the base it ships."""
    from ..pretrain import SHIPPED, ShapesRecipe

    return ShapesRecipe(version="v1", preset="toy", shipped=SHIPPED / "toy")


@hookimpl
def register_backbones(register):
    register("toy", build_toy, summary="Tiny Llama over ShapesWorld words and patch codes (the reference backbone)",
             shapes_recipe=shapes_recipe)
