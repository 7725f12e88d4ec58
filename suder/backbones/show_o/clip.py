"""The CLIP-ViT understanding path of the ``show-o-w-clip-vit`` checkpoints: captions from CLIP features, not
from MAGVIT tokens.

Reference: Show-o (arXiv:2408.12528), the "Show-o w/ CLIP-ViT" variant; the layout is that of showlab/Show-o's
``models/clip_encoder.py``, ``inference_mmu.py``, ``llava/llava_pretrain_data.py`` and
``training/prompting_utils.py`` (``create_attention_mask_for_mmu_vit``):

- vision tower: transformers' ``CLIPVisionModel`` (showlab uses ``openai/clip-vit-large-patch14-336``, not part
  of the Show-o checkpoint) with its ``CLIPImageProcessor``; the features are the penultimate encoder layer's
  hidden states without the CLS position (576 x 1024 at 336 px), frozen;
- ``Showo.mm_projector`` (Linear 1024 -> 2048, GELU, Linear 2048 -> 2048) maps them into the LLM's input space;
- sequences are embeddings, not ids. With a question (``caption_prompt``), the instruction-tuned chat layout of
  ``inference_mmu.py``: ``<|mmu|> SYSTEM_PROMPT <|soi|> image <|eoi|> USER: {question} ASSISTANT:`` then
  `` caption eos`` (no bos; the llava "phi1.5" template). Without one, the captioning layout the projector was
  pre-trained on (llava-pretrain, "plain" template): ``<|mmu|> <|soi|> image <|eoi|>`` then ``caption \\n eos``;
- attention: causal, and the image positions are visible to every row (also the earlier ones); the markers and
  the system prompt stay causal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def image_processor_class():
    """transformers' PIL-based CLIP processor (what showlab's transformers 4.41 used), else the default one."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # older transformers: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class ClipVisionTower(nn.Module):
    """Frozen ``CLIPVisionModel`` + its processor: PIL images -> (B, P, C) patch features of the penultimate
    layer."""

    def __init__(self, model: Any, processor: Any):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name: str, *, torch_dtype: torch.dtype | None = None, device: Any = None):
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(name, dtype=torch_dtype)
        return cls(model.to(device), image_processor_class().from_pretrained(name))

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    @property
    def num_patches(self) -> int:
        cfg = self.model.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @torch.no_grad()
    def forward(self, images: Sequence[Any], chunk: int = 16) -> torch.Tensor:
        """PIL images -> (B, P, C) features: ``hidden_states[-2]`` without the CLS position (``chunk`` images
        per forward)."""
        weight, images = next(self.model.parameters()), list(images)
        out = []
        for i in range(0, len(images), chunk):
            pixels = self.processor(images=images[i : i + chunk], return_tensors="pt")["pixel_values"]
            hidden = self.model(pixels.to(weight.device, weight.dtype), output_hidden_states=True).hidden_states
            out.append(hidden[-2][:, 1:])
        return torch.cat(out)


def mmu_vit_attention_mask(batch: int, length: int, start: int, count: int, device: Any) -> torch.Tensor:
    """(B, 1, L, L) bool: causal, plus columns ``[start, start + count)`` (the image) visible to every row."""
    idx = torch.arange(length, device=device)
    allowed = (idx[:, None] >= idx[None, :]) | ((idx[None, :] >= start) & (idx[None, :] < start + count))
    return allowed.expand(batch, 1, length, length)
