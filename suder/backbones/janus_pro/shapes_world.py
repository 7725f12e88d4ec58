"""Janus-Pro's ShapesWorld default: a small ``JanusForConditionalGeneration``, every part trained here.

``suder pretrain --backbone janus-pro`` and ``suder run --backbone janus-pro`` (no ``--model``) use ``recipe()``
through ``suder.pretrain``'s one mechanism (see its docstring). The model is transformers' own Janus class with
a small ``JanusConfig`` (``shapes_config``); nothing is downloaded:

- **Processor** (``shapes_processor``): a real ``JanusProcessor`` with the released checkpoints' special tokens,
  chat template (``CHAT_TEMPLATE``), default system prompt and left padding, over a byte-level BPE tokenizer
  (the DeepSeek tokenizer's kind) trained in memory on the ShapesWorld words, the system prompt and the
  caption instruction, so that each of their words is one token; BOS is prepended to every text, as the
  DeepSeek tokenizer does. Images are 32 px (``shapes.SIZE``), normalised with mean = std = 0.5 as in Janus-Pro.
- **VQ model** (``SHAPES_VQ``): Janus's VQ-VAE (LlamaGen's) with four resolution levels of 32 channels (stride
  8), so a 32 px image is 4 x 4 codes, 2 x 2 per quadrant (ShapesWorld puts one object in a quadrant); 256
  codes of 8 dims on the unit sphere, as LlamaGen's ``codebook_l2_norm`` (what transformers'
  ``get_codebook_entry`` assumes when it decodes). Trained first by ``train_tokenizer``, not with the VQ-VAE
  objective (van den Oord et al. 2017, eq. 3): that one left the judge reading under a third of the
  reconstructions after minutes of CPU (colours above all; the variants tried are in docs/backbones/janus-pro.md).
  Instead the codes are **clusters of image patches**, as ImageGPT's tokens are k-means clusters of pixel
  colours (Chen et al. 2020, sec. 3.1): ``suder.pretrain.patch_clusters`` takes the 8 x 8 patches (one per code)
  of 512 rendered scenes; at ShapesWorld's stride they are 73 distinct patches (empty, or one quarter of one of
  18 objects), each its own cluster (weighted k-means when there are more patches than codes). Then, jointly:
  the encoder learns to pick each patch's cluster (cross-entropy over its cosine similarities to the codes, temperature
  ``CODE_TEMPERATURE``) and the decoder to draw the scene from the clusters' code vectors (MSE + L1); no
  straight-through estimator, commitment, perceptual or adversarial terms. 1200 steps of 8 scenes, Adam lr 2e-3
  with a short warm-up and cosine decay. Codes no patch maps to stay unused. The stored codebook is normalised,
  so that transformers' un-normalised nearest-code search picks the codes training used.
- **Language model** (``SHAPES_TEXT``): Llama, 4 layers of width 128; **vision encoder** (``SHAPES_VISION``):
  SigLIP with 8 px patches (16 image tokens, as many as codes) and the two-layer aligner; the generation
  embeddings, aligner and head are Janus's. ``suder.pretrain.pretrain`` trains all of them but the VQ model
  through the protocol's two log-prob methods: next-code prediction of the image given the prompt (the
  prompt dropped for 10% of rows, for guidance) and next-token prediction of the caption given the image,
  2000 steps of 32 + 16 pairs (the recipe's seed: bases differ by seed, and this one leaves DSR the most to
  gain). The prompt-to-object binding appears late in pre-training, and longer pre-training teaches the
  generation side relations before the captioner (docs/results.md).
  The vision encoder trains with them (Janus-Pro's stage 1 freezes it, but here it starts from random
  weights); it is frozen again during self-improvement (``freeze_vision_encoder``, the adapter's default).

Sampling settings saved with the base (``SHAPES_SETTINGS``): guidance ``SHAPES_GUIDANCE`` (1: none; CFG 1.25,
1.5 and 2 draw fewer correct images on this base, its prompt-free model being weak), captions up to 24 tokens.
``suder run`` trains it at guidance 2 with the ``guided`` policy (its preset, ``suder/presets/janus-pro.yaml``),
which turns guidance from a handicap into its best T2I, and saves that scale with the trained model.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

# Special tokens of the DeepSeek tokenizer the Janus-Pro checkpoints use, in id order here.
PAD_TOKEN = "<｜▁pad▁｜>"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
SPECIALS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<begin_of_image>", "<end_of_image>", "<image_placeholder>",
            "<|User|>", "<|Assistant|>"]
PAD, BOS, EOS, BOI, EOI, IMG = range(6)

# The released processors' chat template (DeepSeek's "deepseek" SFT format, as transformers' Janus conversion
# writes it), restated: "<|User|>: " / "<|Assistant|>: " / "Role: " heads; images as "<image_placeholder>"
# with a newline between an image and a neighbouring part; adjacent texts joined by a space, the message's
# text stripped at its ends; turns closed by "\n\n" (user) or the end-of-sentence token (others), the last
# one only when a generation prompt follows; then "<|Assistant|>:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "{%- set parts = message['content'] -%}"
    "{%- if role == 'user' -%}{{ '<|User|>: ' }}"
    "{%- elif role == 'assistant' -%}{{ '<|Assistant|>:' }}"
    "{%- if not (loop.last and not add_generation_prompt and parts[0]['type'] == 'text'"
    " and parts[0]['text'] == '') -%}{{ ' ' }}{%- endif -%}"
    "{%- else -%}{{ message['role'] | capitalize }}{{ ': ' }}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{ '' if loop.first else '\\n' }}{{ '<image_placeholder>' }}{{ '' if loop.last else '\\n' }}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set text = part['text'] -%}"
    "{%- if loop.first -%}{%- set text = text.lstrip() -%}{%- endif -%}"
    "{%- if loop.last -%}{%- set text = text.rstrip() -%}{%- endif -%}"
    "{%- if not loop.first and parts[loop.index0 - 1]['type'] == 'text' -%}{{ ' ' }}{%- endif -%}"
    "{{ text }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not loop.last or add_generation_prompt -%}"
    "{{ '\\n\\n' if role == 'user' else '" + EOS_TOKEN + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|Assistant|>:' }}{%- endif -%}"
)

SHAPES_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256)
SHAPES_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4.0, patch_size=8,
                     depth=2)
SHAPES_VQ = dict(embed_dim=8, num_embeddings=256, latent_channels=32, base_channels=32,
                 channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, num_hidden_layers=2)
SHAPES_GUIDANCE = 1.0  # no guidance: on this base any CFG scale above 1 draws fewer correct images
SHAPES_SETTINGS = dict(guidance_scale=SHAPES_GUIDANCE, max_caption_tokens=24)
CODE_TEMPERATURE = 0.1  # of the cosine similarities the encoder's code assignment is trained on


# --------------------------------------------------------------------------------------------- processor
@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    from ...worlds import shapes
    from .modeling import DEFAULT_INSTRUCTION

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,  # an upper bound: merging stops once every word is a single token
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = [*shapes.VOCAB_WORDS, *DEFAULT_SYSTEM_PROMPT.split(), *DEFAULT_INSTRUCTION.split(), "User", "Assistant"]
    tok.train_from_iterator([" ".join(words), DEFAULT_SYSTEM_PROMPT, *(f"{w} {w}" for w in words)], trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS)])
    return tok.to_str()


def shapes_processor(num_image_tokens: int | None = None):
    """A real ``JanusProcessor`` for 32 px images (see the module docstring); ``num_image_tokens`` defaults to
    ``SHAPES_VISION``'s patch count."""
    from tokenizers import Tokenizer
    from transformers import JanusProcessor, PreTrainedTokenizerFast
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from ...worlds import shapes

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, padding_side="left",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"},
    )
    # the PIL class is the one transformers picks without torchvision
    image_processor = JanusImageProcessorPil(size={"height": shapes.SIZE, "width": shapes.SIZE},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                          use_default_system_prompt=True,
                          num_image_tokens=num_image_tokens or (shapes.SIZE // SHAPES_VISION["patch_size"]) ** 2)


def shapes_config(vocab_size: int, text: dict | None = None, vision: dict | None = None, vq: dict | None = None):
    """The ``JanusConfig`` of the ShapesWorld model (``SHAPES_*`` updated by ``text`` / ``vision`` / ``vq``).

    Sizes that must agree are derived: the projections equal the text width, the vision encoder sees 32 px in
    ``patch_size`` patches, and the VQ model makes as many codes (``num_patches`` per side) as SigLIP tokens."""
    from transformers import JanusConfig

    from ...worlds import shapes

    text_cfg, vision_cfg, vq_cfg = {**SHAPES_TEXT, **(text or {})}, {**SHAPES_VISION, **(vision or {})}, \
        {**SHAPES_VQ, **(vq or {})}
    width = text_cfg["hidden_size"]
    side = shapes.SIZE // vision_cfg["patch_size"]
    stride = 2 ** (len(vq_cfg["channel_multiplier"]) - 1)
    assert side * stride == shapes.SIZE, f"{side} SigLIP patches per side but a VQ stride of {stride} at 32 px"
    text_cfg |= dict(model_type="llama", vocab_size=vocab_size, bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=PAD, tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6)
    vision_cfg |= dict(image_size=shapes.SIZE, projection_dim=width, num_image_tokens=side * side)
    vq_cfg |= dict(num_patches=side, projection_dim=width, image_token_embed_dim=width)
    return JanusConfig(text_config=text_cfg, vision_config=vision_cfg, vq_config=vq_cfg, image_token_id=IMG,
                       tie_word_embeddings=False)


# --------------------------------------------------------------------------------------------- VQ training
def _pixels(images: list[Any]) -> torch.Tensor:
    """PIL images -> (B, 3, 32, 32) in [-1, 1], the VQ model's range."""
    import numpy as np

    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def _latents(vq: Any, x: torch.Tensor) -> torch.Tensor:
    """(B h w, D) encoder outputs of pixels ``x`` on the unit sphere, in the row-major order of the codes."""
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _codes(vq: Any, x: torch.Tensor) -> torch.Tensor:
    """(B h w,) nearest codes on the sphere of pixels ``x`` (what transformers' ``encode`` picks once the
    codebook is normalised)."""
    return (_latents(vq, x) @ F.normalize(vq.quantize.embedding.weight, dim=-1).t()).argmax(-1)


def train_tokenizer(vq: Any, *, steps: int = 1200, batch_size: int = 8, lr: float = 2e-3, seed: int = 0,
                    callback: Callable[[dict], None] | None = None) -> list[float]:
    """Train ``vq`` (a ``JanusVQVAE``) on rendered ShapesWorld scenes (the recipe in the module docstring);
    returns the losses. Deterministic for a seed. Ends with the codebook rows normalised."""
    from ...pretrain import image_patches, patch_clusters
    from ...worlds import shapes

    torch.manual_seed(seed)
    rng = random.Random(seed)
    stride = shapes.SIZE // vq.config.num_patches
    centres = patch_clusters(vq.quantize.num_embeddings, stride, seed=rng.randrange(2**31))
    vq.train().requires_grad_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))))
    side = vq.config.num_patches
    losses = []
    for step in range(steps):
        x = _pixels([shapes.render(s) for s in shapes.sample_scenes(batch_size, seed=rng.randrange(2**31))])
        target = torch.cdist(image_patches(x, stride), centres).argmin(-1)  # (B h w,) each patch's cluster = its code
        codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
        assign = F.cross_entropy(_latents(vq, x) @ codebook.t() / CODE_TEMPERATURE, target)
        q = codebook[target].view(len(x), side, side, -1).permute(0, 3, 1, 2)
        recon = vq.decoder(vq.post_quant_conv(q))
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + assign
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback:
            callback({"step": step + 1, "total_steps": steps, "loss": losses[-1]})
    normalize_codebook(vq)
    vq.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def normalize_codebook(vq: Any) -> None:
    """Store the codebook on the unit sphere, where training searched it: transformers' ``encode`` (nearest
    code by squared distance, un-normalised) then picks training's codes, and ``decode`` (which normalises)
    reads the same vectors."""
    vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))


@torch.no_grad()
def reconstruction_accuracy(backbone: Any, num: int = 400, seed: int = 999) -> dict[str, float]:
    """``suder.pretrain.reconstruction_accuracy`` through the backbone's VQ (``encode_images``,
    ``decode_images``): how often the judge reads a held-out scene, encoded and decoded, as the scene itself."""
    from ...pretrain import reconstruction_accuracy as accuracy

    return accuracy(backbone.encode_images, backbone.decode_images, num, seed)


# --------------------------------------------------------------------------------------------- the recipe
def build_shapes_base(seed: int = 0, callback: Callable[[dict], None] | None = None, *,
                      text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
                      vq: dict[str, Any] | None = None, tokenizer_steps: int = 1200, tokenizer_batch_size: int = 8,
                      **settings: Any):
    """An untrained Janus-Pro at ShapesWorld scale whose VQ model is already trained (``callback`` sees its
    steps) and whose vision encoder trains with the rest; ``text`` / ``vision`` / ``vq`` override the
    ``SHAPES_*`` sizes (tests use tiny ones), ``settings`` the saved backbone settings (``SHAPES_SETTINGS``)."""
    from transformers import JanusForConditionalGeneration

    from .modeling import JanusProBackbone

    start = time.perf_counter()
    processor = shapes_processor()
    config = shapes_config(len(processor.tokenizer), text, vision, vq)
    processor.num_image_tokens = config.vision_config.num_image_tokens
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    train_tokenizer(model.model.vqmodel, steps=tokenizer_steps, batch_size=tokenizer_batch_size, seed=seed,
                    callback=callback)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = BOS, EOS, PAD
    gc.generation_kwargs = {"boi_token_id": BOI}  # image-mode ``generate`` reads it here, as hub configs carry it
    gc.guidance_scale = settings.get("guidance_scale", SHAPES_GUIDANCE)
    backbone = JanusProBackbone.from_model(model.eval(), processor, **{**SHAPES_SETTINGS, **settings})
    # trained from scratch: the vision encoder learns through the captioning loss during pre-training only
    # (the saved setting keeps it frozen for self-improvement, as the adapter does by default)
    model.model.vision_model.requires_grad_(True)
    backbone.tokenizer_seconds = time.perf_counter() - start
    return backbone


def recipe():
    """Janus-Pro's ShapesWorld base recipe (``suder.pretrain.ShapesRecipe``)."""
    from ...pretrain import SHIPPED, ShapesRecipe

    return ShapesRecipe(
        build=build_shapes_base,
        version="v3",
        pretrain=dict(steps=2000, seed=2, batch_size=32, caption_batch_size=16, lr=1e-3, warmup_steps=50),
        preset="janus-pro",  # suder/presets/janus-pro.yaml: guidance 2, lr 5e-5, 16 images per prompt (why: there)
        shipped=SHIPPED / "janus-pro",  # suder/bases/janus-pro: the base of docs/results.md
    )
