"""A tiny random Janus-Pro (``JanusConfig``) and a small real ``JanusProcessor``, built offline in memory.

The architecture is the real one (SigLIP encoder + aligner, VQ model, generation embeddings / aligner / head,
Llama), shrunk to 1.3M parameters: 64 px images of 8 x 8 = 64 image tokens (the real model: 384 px, 24 x 24 =
576), a 320-token byte-level BPE vocabulary trained in memory with ``tokenizers`` (512 rows in the model, as
the real ~100k-token tokenizer sits in a 102400-row embedding), and the real processor classes with the real
special tokens, left padding, chat format and default system prompt. Nothing is downloaded.

Constraints of ``JanusConfig`` that the sizes respect: the projection dims equal the
text hidden size; ``base_channels * multiplier`` is a multiple of 32; ``num_image_tokens`` is
``(image_size / patch_size) ** 2``; the VQ input side ``num_patches * 2 ** (len(channel_multiplier) - 1)`` is
``image_size``. ``tie_word_embeddings=False`` as in the released checkpoints (``JanusConfig`` defaults to
True, which would tie ``lm_head`` to ``embed_tokens``).
"""

from __future__ import annotations

import functools

# Special tokens of the real DeepSeek/Janus tokenizer, in id order for the tiny one.
PAD_TOKEN = "<｜▁pad▁｜>"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
SPECIALS = [
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    "<begin_of_image>",
    "<end_of_image>",
    "<image_placeholder>",
    "<|User|>",
    "<|Assistant|>",
]
PAD, BOS, EOS, BOI, EOI, IMG = range(6)

# The chat format of the converted Janus-Pro processors ("deepseek" SFT format) for the turns suder uses:
#   "<|User|>: {text}\n\n<|Assistant|>:" and "<|User|>: <image_placeholder>\n{text}\n\n<|Assistant|>:".
# Written here (not copied from the converter) so that the tiny processor formats prompts like the real one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|User|>: {% elif message['role'] == 'assistant' -%}<|Assistant|>: "
    "{% endif -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}<image_placeholder>{{ '\n' if not loop.last else '' }}"
    "{%- elif content['type'] == 'text' -%}{{ content['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'user' -%}{{ '\n\n' }}{%- else -%}" + EOS_TOKEN + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|Assistant|>:{%- endif -%}"
)

CORPUS = [
    "a red circle above a blue square",
    "a green triangle left of a yellow star",
    "two purple cats sitting on a wooden table",
    "Describe this image.",
    "The image shows a photo of a dog in the rain.",
]

TINY_CONFIG = {
    "text_config": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mlp_ratio": 2.0,
        "image_size": 64,
        "patch_size": 8,
        "projection_dim": 64,
        "depth": 2,
        "num_image_tokens": 64,
    },
    "vq_config": {
        "embed_dim": 8,
        "num_embeddings": 256,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "projection_dim": 64,
        "image_token_embed_dim": 64,
        "num_hidden_layers": 2,
    },
    "image_token_id": IMG,
    "tie_word_embeddings": False,
}
NUM_IMAGE_TOKENS = 64
IMAGE_SIZE = 64


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    # the DeepSeek tokenizer prepends BOS to every encoded text
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS)]
    )
    return tok.to_str()


def tiny_processor():
    """A real ``JanusProcessor`` (left padding, default system prompt, 64 image tokens at 64 px)."""
    from tokenizers import Tokenizer
    from transformers import JanusProcessor, PreTrainedTokenizerFast
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    # mean = std = 0.5 as in the Janus-Pro checkpoints: pixel values in [-1, 1]. The PIL class is the one
    # transformers picks without torchvision.
    image_processor = JanusImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        use_default_system_prompt=True,
        num_image_tokens=NUM_IMAGE_TOKENS,
    )


def tiny_model(seed: int = 0, dtype=None):
    """A random ``JanusForConditionalGeneration`` (1.3M parameters) with sharpened generation and text heads,
    so that samples and log-probs are not near-uniform and a wrong index or shift shows up in the tests, and a
    louder end-of-sentence row, so that the sampled captions of one batch have different lengths."""
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(JanusConfig(**TINY_CONFIG)).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(20.0)
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[EOS].mul_(5.0)  # some captions end early, some run to the limit
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = BOS, EOS, PAD
    # image-mode generate reads the BOI id from generation_kwargs, as hub generation_config.json files carry it
    gc.generation_kwargs = {"boi_token_id": BOI}
    gc.guidance_scale = 5
    return model.to(dtype) if dtype is not None else model


def tiny_backbone(seed: int = 0, **options):
    """The suder adapter around the tiny model (CPU, float32)."""
    from suder.backbones.janus_pro import JanusProBackbone

    return JanusProBackbone.from_model(tiny_model(seed), tiny_processor(), **options)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)):
    """``n`` random RGB PIL images (not square, so the processor pads them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]
