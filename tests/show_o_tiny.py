"""Tiny Show-o parts for CPU tests: a byte-level BPE tokenizer trained in memory, a 2-layer Showo and a 16 px
MAGVIT-v2 with 64 codes.

The token layout is the released one shifted down: the tokenizer's own vocabulary (``<|endoftext|>`` = bos =
eos at id 0, then bytes and merges) ends at ``llm_vocab_size = len(tokenizer)``; ``[PAD]`` and the nine task
tokens follow, then 64 image codes, then the mask token. The code reads every id from the config and the
tokenizer, so nothing else changes.
"""

from __future__ import annotations

import torch

CORPUS = [
    "a red square to the left of a blue circle",
    "two green triangles above a white square",
    "a photo of a cat sitting on a wooden table",
    "USER: describe the image ASSISTANT: a small dog on the grass",
    "three yellow circles and one black square",
] * 4

TINY_LLM = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
    max_text_len=16,
    codebook_size=64,
    num_vq_tokens=16,
)
TINY_VQ = dict(
    ch=32,
    encoder_ch_mult=(1, 1, 2),
    encoder_num_res_blocks=(1, 1, 1),
    decoder_ch_mult=(1, 1, 2),
    decoder_num_res_blocks=(1, 1, 1),
    z_channels=6,
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tiny_parts(seed: int = 0):
    """(Showo, MAGVITv2, tokenizer) with random weights (seeded)."""
    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.backbones.show_o.modeling import Showo

    tokenizer = tiny_tokenizer()
    llm_vocab = len(tokenizer)
    torch.manual_seed(seed)
    showo = Showo(llm_vocab_size=llm_vocab, vocab_size=llm_vocab + 10 + TINY_LLM["codebook_size"] + 1, **TINY_LLM)
    # transformers initialises with std 0.02: scale up the head so the tiny model's distributions are not flat
    with torch.no_grad():
        showo.showo.lm_head.weight.mul_(20)
    vq = MAGVITv2(**TINY_VQ)
    return showo.eval(), vq.eval(), tokenizer


def tiny_backbone(seed: int = 0, **settings):
    from suder.backbones.show_o.factory import from_parts

    showo, vq, tokenizer = tiny_parts(seed)
    settings.setdefault("guidance_scale", 1.5)
    settings.setdefault("max_caption_tokens", 8)
    return from_parts(showo, vq, tokenizer, **settings)


def tiny_images(n: int, seed: int = 0):
    """``n`` random 20x24 RGB PIL images (not square, so the resize + crop path runs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


TINY_CLIP = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    projection_dim=8,
)


def tiny_clip_parts(seed: int = 0):
    """(Showo with ``mm_projector``, ClipVisionTower, MAGVITv2, tokenizer): a tiny ``show-o-w-clip-vit`` whose
    CLIP ViT sees 28 px images as 2 x 2 patches of 14 px (4 feature vectors of 16 channels)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from suder.backbones.show_o.clip import ClipVisionTower, image_processor_class
    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.backbones.show_o.modeling import Showo

    tokenizer = tiny_tokenizer()
    llm_vocab = len(tokenizer)
    torch.manual_seed(seed)
    showo = Showo(
        w_clip_vit=True,
        llm_vocab_size=llm_vocab,
        vocab_size=llm_vocab + 10 + TINY_LLM["codebook_size"] + 1,
        clip_hidden_size=TINY_CLIP["hidden_size"],
        **TINY_LLM,
    )
    with torch.no_grad():
        showo.showo.lm_head.weight.mul_(20)
    vision = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    processor = image_processor_class()(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    vq = MAGVITv2(**TINY_VQ)
    return showo.eval(), ClipVisionTower(vision, processor), vq.eval(), tokenizer


def tiny_clip_backbone(seed: int = 0, **settings):
    from suder.backbones.show_o.factory import from_parts

    showo, vision, vq, tokenizer = tiny_clip_parts(seed)
    settings.setdefault("guidance_scale", 1.5)
    settings.setdefault("max_caption_tokens", 8)
    return from_parts(showo, vq, tokenizer, vision=vision, **settings)
