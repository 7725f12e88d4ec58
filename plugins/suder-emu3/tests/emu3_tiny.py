"""A tiny random Emu3 (``Emu3Config``), a small byte-level BPE tokenizer with Emu3's special tokens, and the
default ``Emu3ImageProcessor``, built offline in memory.

The architecture is the real one (``Emu3ForConditionalGeneration``: a Llama-style decoder and the 3D-conv
``Emu3VQVAE``), shrunk: 8 px images, a VQ factor of 2 (``channel_multiplier=[1, 1]``), so 4 x 4 = 16 codes from a
64-entry codebook (the real model: 720 px, factor 8, 90 x 90 codes of 32,768), and a 2-layer 32-wide decoder.
The output head is scaled up so that distributions are not near-uniform and a wrong index or shift shows.
"""

from __future__ import annotations

import functools

CODES = 64
SPECIALS = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image start|>", "<|image end|>",
            "<|image token|>", "<|extra_200|>", "<|extra_201|>", "<image>"]
VISUAL = [f"<|visual token {i:06d}|>" for i in range(CODES)]
CORPUS = [
    "a red circle above a blue square",
    "a green triangle left of a yellow star",
    "You are a helpful assistant. USER: Please describe the image. ASSISTANT:",
    "The image shows a photo of a dog in the rain.",
    " masterpiece, film grained, best quality.",
    "lowres, bad anatomy, bad hands, text, error, worst quality, low quality, blurry.",
    "0123456789*",
]
IMAGE_SIZE = 8


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + VISUAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token=SPECIALS[0],
                                   bos_token=SPECIALS[1], eos_token=SPECIALS[2])


def tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vocab = tokenizer.get_vocab()
    config = Emu3Config(
        vq_config=dict(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=vocab[SPECIALS[0]], bos_token_id=vocab[SPECIALS[1]],
                         eos_token_id=vocab[SPECIALS[2]], attention_dropout=0.0),
        vocabulary_map=vocab,
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def tiny_backbone(seed: int = 0, und_seed: int | None = None, **settings):
    """The adapter around a tiny model; ``und_seed``: a second tiny checkpoint that captions (Gen + Chat)."""
    from suder_emu3.backbone import Emu3Backbone, Emu3Settings
    from transformers import Emu3ImageProcessor

    tokenizer = tiny_tokenizer()
    settings = {"image_size": IMAGE_SIZE, "max_caption_tokens": 8, **settings}
    und = None if und_seed is None else tiny_model(tokenizer, und_seed)
    return Emu3Backbone(tiny_model(tokenizer, seed), tokenizer, Emu3ImageProcessor(), Emu3Settings(**settings), und)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (12, 10)):
    """``n`` random RGB PIL images (not square, so the resize runs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
