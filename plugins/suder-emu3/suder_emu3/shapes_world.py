"""Emu3's ShapesWorld default: a small ``Emu3ForConditionalGeneration``, every part trained here.

``suder pretrain --backbone emu3`` and ``suder run --backbone emu3`` (no ``--model``) use ``recipe()`` through
suder's one pre-training mechanism (``suder.ShapesRecipe``, docs/writing-a-plugin.md). The model is transformers'
own Emu3 class with a small ``Emu3Config`` (``shapes_config``); nothing is downloaded:

- **Tokenizer** (``shapes_tokenizer``): a byte-level BPE (the kind of Emu3's own) trained in memory on the
  ShapesWorld words and the words of the prompt layout (system prompt, caption instruction, ``USER``,
  ``ASSISTANT``, the size ``4*4``), so that each word is one token, plus Emu3's special tokens (``<|extra_203|>``
  begins a text, ``<|extra_204|>`` ends one, ``<|extra_200|>`` ends a row of codes, ...) and one
  ``<|visual token NNNNNN|>`` per code, the names ``Emu3ImageVocabularyMapping`` reads.
- **Image tokenizer** (``SHAPES_VQ``): Emu3's 3D-conv VQ-VAE (``Emu3VQVAE``) with four resolution levels of 32
  channels (stride 8), so a 32 px image is 4 x 4 codes, 2 x 2 per quadrant, with no temporal down-sampling
  (``temporal_downsample_factor=1``: one image is one frame) and no attention blocks; 128 codes of 8 dims.
  Trained first by ``train_tokenizer`` as Janus-Pro's ShapesWorld VQ is (suder's janus-pro page): the codes are
  clusters of the 8 x 8 image patches (``suder.pretrain.patch_clusters``: 73 distinct patches at this stride, so
  each its own code), the encoder learns to pick a patch's cluster (cross-entropy over cosine similarities to the
  unit-norm codes, temperature ``CODE_TEMPERATURE``) and the decoder to draw the scene from the codes (MSE + L1).
  The stored codebook is normalised, so transformers' nearest-code search (squared distance) picks the codes
  training used.
- **Language model** (``SHAPES_TEXT``): Emu3's Llama-style decoder, 4 layers of width 128, trained by
  ``suder.pretrain`` through the protocol's two log-prob methods (next-code prediction given the prompt, the
  prompt dropped for 10% of rows; next-token prediction of the caption given the codes).

Sampling settings saved with the base (``SHAPES_SETTINGS``): 32 px images, no positive prompt and an empty
negative prompt (the unconditional row of guidance is then the prompt-dropped row of pre-training), top-k off
(128 codes), captions up to 24 tokens, guidance 1 (none) for the base; the run preset (``shapes.yaml`` beside
this module) sets what self-improvement uses.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .backbone import BOI, EOF, EOI, EOL, IMG, Emu3Settings

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|extra_203|>", "<|extra_204|>"
SPECIALS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, BOI, EOI, IMG, EOL, EOF, "<image>"]
SHAPES_CODES = 128
SHAPES_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256)
SHAPES_VQ = dict(codebook_size=SHAPES_CODES, embed_dim=8, latent_channels=8, base_channels=32,
                 channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=1,
                 hidden_size=32, num_attention_heads=1)
SHAPES_SETTINGS = dict(image_size=32, guidance_scale=1.0, top_k=None, positive_prompt="", negative_prompt="",
                       max_caption_tokens=24)
CODE_TEMPERATURE = 0.1  # of the cosine similarities the encoder's code assignment is trained on
PRESET = Path(__file__).with_name("shapes.yaml")
SHIPPED = Path(__file__).with_name("base")


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


# --------------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=4)
def _tokenizer_json(codes: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from suder.worlds import shapes

    settings = Emu3Settings()
    layout = f"{settings.system_prompt} USER: 4*4 {settings.caption_prompt}. ASSISTANT:"
    words = [*shapes.VOCAB_WORDS, *layout.split()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,  # an upper bound: merging stops once every word is a single token
        special_tokens=SPECIALS + [visual_token(i) for i in range(codes)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(words), layout, *(f"{w} {w}" for w in words)], trainer)
    return tok.to_str()


def shapes_tokenizer(codes: int = SHAPES_CODES):
    """A ``PreTrainedTokenizerFast`` over the ShapesWorld words with Emu3's special tokens and ``codes`` visual
    tokens (see the module docstring)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(codes)), pad_token=PAD_TOKEN,
                                   bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


def shapes_image_processor():
    """``Emu3ImageProcessor`` for 32 px images scaled to [-1, 1] (mean = std = 0.5), the VQ-VAE's range."""
    from transformers import Emu3ImageProcessor

    from suder.worlds import shapes

    area = shapes.SIZE * shapes.SIZE
    return Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=area, max_pixels=area)


def shapes_config(tokenizer: Any, text: dict | None = None, vq: dict | None = None):
    """The ``Emu3Config`` of the ShapesWorld model (``SHAPES_TEXT`` / ``SHAPES_VQ`` updated by ``text`` / ``vq``)."""
    from transformers import Emu3Config

    vocab = tokenizer.get_vocab()
    text_cfg = {**SHAPES_TEXT, **(text or {})}
    text_cfg |= dict(vocab_size=len(vocab), pad_token_id=vocab[PAD_TOKEN], bos_token_id=vocab[BOS_TOKEN],
                     eos_token_id=vocab[EOS_TOKEN], attention_dropout=0.0, tie_word_embeddings=False)
    return Emu3Config(vq_config={**SHAPES_VQ, **(vq or {})}, text_config=text_cfg, vocabulary_map=vocab,
                      tie_word_embeddings=False)


# --------------------------------------------------------------------------------------------- VQ training
def _pixels(images: list[Any]) -> torch.Tensor:
    """PIL images -> (B, 3, 32, 32) in [-1, 1], the VQ-VAE's range."""
    import numpy as np

    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def _latents(vq: Any, x: torch.Tensor) -> torch.Tensor:
    """(B h w, D) unit-norm encoder outputs of pixels ``x`` (B, 3, S, S), in the codes' row-major order; the path
    of ``Emu3VQVAE.encode`` up to its quantizer, for one-frame images."""
    h = vq.encoder(x.unsqueeze(1))  # (B, 1, C, h, w)
    z = vq.quant_conv(h.permute(0, 2, 1, 3, 4)).permute(0, 2, 3, 4, 1)  # (B, 1, h, w, D)
    return F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)


def _draw(vq: Any, q: torch.Tensor) -> torch.Tensor:
    """(B, h, w, D) code vectors -> (B, 3, S, S) pixels; the path of ``Emu3VQVAE.decode`` after its lookup."""
    quant = q.unsqueeze(1).permute(0, 4, 1, 2, 3)  # (B, D, 1, h, w)
    post = vq.post_quant_conv(quant)
    video = vq.decoder(post.permute(0, 2, 1, 3, 4), quant.permute(0, 2, 1, 3, 4))
    return video.reshape(q.shape[0], -1, 3, *video.shape[-2:])[:, 0]


def train_tokenizer(vq: Any, *, steps: int = 1200, batch_size: int = 8, lr: float = 2e-3, seed: int = 0,
                    callback: Callable[[dict], None] | None = None) -> list[float]:
    """Train ``vq`` (an ``Emu3VQVAE``) on rendered ShapesWorld scenes (the recipe in the module docstring);
    returns the losses. Deterministic for a seed. Ends with the codebook rows normalised, the VQ frozen."""
    from suder.pretrain import image_patches, patch_clusters
    from suder.worlds import shapes

    torch.manual_seed(seed)
    rng = random.Random(seed)
    stride = vq.vision_spatial_factor
    side = shapes.SIZE // stride
    centres = patch_clusters(vq.config.codebook_size, stride, seed=rng.randrange(2**31))
    vq.train().requires_grad_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))))
    losses = []
    for _ in range(steps):
        x = _pixels([shapes.render(s) for s in shapes.sample_scenes(batch_size, seed=rng.randrange(2**31))])
        target = torch.cdist(image_patches(x, stride), centres).argmin(-1)  # (B h w,) each patch's cluster = its code
        codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
        assign = F.cross_entropy(_latents(vq, x) @ codebook.t() / CODE_TEMPERATURE, target)
        recon = _draw(vq, codebook[target].view(len(x), side, side, -1))
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + assign
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback:
            callback({"step": len(losses), "total_steps": steps, "loss": losses[-1]})
    with torch.no_grad():  # transformers' un-normalised nearest-code search then picks training's codes
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    vq.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def reconstruction_accuracy(backbone: Any, num: int = 400, seed: int = 999) -> dict[str, float]:
    """``suder.pretrain.reconstruction_accuracy`` through the backbone's VQ-VAE (``image_codes``,
    ``decode_images``): how often the judge reads a held-out scene, encoded and decoded, as the scene itself."""
    from suder.pretrain import reconstruction_accuracy as accuracy

    return accuracy(backbone.image_codes, backbone.decode_images, num, seed)


# --------------------------------------------------------------------------------------------- the recipe
def build_shapes_base(seed: int = 0, callback: Callable[[dict], None] | None = None, *,
                      text: dict[str, Any] | None = None, vq: dict[str, Any] | None = None,
                      tokenizer_steps: int = 1200, tokenizer_batch_size: int = 8, **settings: Any):
    """An untrained Emu3 at ShapesWorld scale whose VQ-VAE is already trained (``callback`` sees its steps);
    ``text`` / ``vq`` override the ``SHAPES_*`` sizes (tests pass tiny ones), ``settings`` the saved
    ``Emu3Settings`` (``SHAPES_SETTINGS``)."""
    from transformers import Emu3ForConditionalGeneration

    from .backbone import Emu3Backbone

    codes = (vq or {}).get("codebook_size", SHAPES_CODES)
    tokenizer = shapes_tokenizer(codes)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(shapes_config(tokenizer, text, vq))
    train_tokenizer(model.model.vqmodel, steps=tokenizer_steps, batch_size=tokenizer_batch_size, seed=seed,
                    callback=callback)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.convert_tokens_to_ids(t)
                                                         for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    return Emu3Backbone(model.eval(), tokenizer, shapes_image_processor(),
                        Emu3Settings(**{**SHAPES_SETTINGS, **settings}))


def recipe():
    """Emu3's ShapesWorld base recipe (a ``suder.ShapesRecipe``)."""
    from suder import ShapesRecipe

    return ShapesRecipe(
        build=build_shapes_base,
        version="v1",
        pretrain=dict(steps=1000, seed=0, batch_size=32, caption_batch_size=16, lr=1e-3, warmup_steps=50),
        preset=PRESET,
        shipped=SHIPPED if (SHIPPED / "pretrain.json").is_file() else None,
    )
