"""MAGVIT-v2 image tokenizer of Show-o: a taming-style VQGAN with a 13-bit lookup-free quantizer (LFQ).

Reference: Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation"
(arXiv:2310.05737), section 3.1 (LFQ); the architecture and key names are those of the ``showlab/magvitv2``
release (``models/modeling_magvitv2.py`` and ``models/common_modules.py`` of showlab/Show-o). We write our own
modules because no maintained library ships this tokenizer; the key names match the release so
``MAGVITv2.from_pretrained("showlab/magvitv2")`` loads it.

- Encoder: conv_in, five levels of ResNet blocks (downsample after the first four: stride 16), mid
  (block, attention, block), GroupNorm + swish + conv_out to 13 channels, 1x1 ``quant_conv``.
- LFQ: code = sum_c 2^(12 - c) [z_c > 0] (channel 0 is the most significant bit); ``embedding`` row i holds
  the bits of i as -1/+1. Only inference is implemented (no entropy/commitment losses: the tokenizer is
  frozen).
- Decoder: ``post_quant_conv``, conv_in, mid, five up levels (upsample after levels 4..1), GroupNorm + swish +
  conv_out to RGB in roughly [-1, 1].

The sizes are constructor arguments so tests can build a tiny tokenizer; the defaults are the release's (its
config.json is empty). Attention uses ``scaled_dot_product_attention`` (same maths as the q k^T softmax of the
original, less memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from torch.nn import functional as F

from .modeling import ShowlabCheckpoint


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, C^-0.5 scaling, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, 1, c, h * w).transpose(-1, -2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: Sequence[int], z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for level, (mult, blocks) in enumerate(zip(ch_mult, num_res_blocks, strict=True)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(blocks):
                stage.block.append(ResnetBlock(cin, ch * mult))
                cin = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = _mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: Sequence[int], z_channels: int):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        stages: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks[level]):
                stage.block.append(ResnetBlock(cin, ch * ch_mult[level]))
                cin = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(cin)
            stages.insert(0, stage)  # ``up.{level}`` keeps the level's index, processed from the top down
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(self.post_quant_conv(z)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Lookup-free quantizer: sign per channel, code = bits read most significant first."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        powers = 2 ** torch.arange(codebook_dim - 1, -1, -1, dtype=torch.long)
        bits = (torch.arange(2**codebook_dim)[:, None] & powers) != 0
        self.register_buffer("embedding", bits.float() * 2 - 1, persistent=True)
        self.register_buffer("power_vals", powers, persistent=True)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W) long, raster order; z > 0 is bit 1 (0 itself is bit 0)."""
        bits = (z > 0).long()
        return (bits * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def lookup(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, H*W) -> (B, C, H, W) of -1/+1."""
        return self.embedding[codes].view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class MAGVITv2(ShowlabCheckpoint, ModelMixin, ConfigMixin):
    """The frozen image tokenizer: ``get_code`` pixels -> codes, ``decode_code`` codes -> pixels."""

    @register_to_config
    def __init__(
        self,
        ch: int = 128,
        encoder_ch_mult: Sequence[int] = (1, 2, 2, 4, 4),
        encoder_num_res_blocks: Sequence[int] = (4, 3, 4, 3, 4),
        decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        decoder_num_res_blocks: Sequence[int] = (4, 4, 3, 4, 3),
        z_channels: int = 13,
    ):
        super().__init__()
        self.encoder = Encoder(ch, encoder_ch_mult, encoder_num_res_blocks, z_channels)
        self.decoder = Decoder(ch, decoder_ch_mult, decoder_num_res_blocks, z_channels)
        self.quantize = LFQuantizer(z_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return 2**self.config.z_channels

    @torch.no_grad()
    def get_code(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H*W/stride^2) long codes."""
        return self.quantize.codes(self.encoder(pixels))

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, N) codes -> (B, 3, H, W) pixels in roughly [-1, 1]; the grid is square unless ``shape`` is
        given."""
        h, w = shape if shape is not None else (math.isqrt(codes.shape[1]),) * 2
        return self.decoder(self.quantize.lookup(codes, h, w).to(self.decoder.conv_in.weight.dtype))


# --------------------------------------------------------------------------------------------- pixels
def image_to_tensor(image: Any, resolution: int) -> torch.Tensor:
    """PIL image -> (3, R, R) in [-1, 1]: shorter side to R (bicubic), centre crop, scale (Show-o's
    ``image_transform``).

    Matches torchvision's Resize(R) + CenterCrop(R) + ToTensor + Normalize(0.5, 0.5) on PIL images
    (torchvision is not a suder dependency).
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    return (array.permute(2, 0, 1) - 0.5) / 0.5


def tensor_to_images(pixels: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) in [-1, 1] -> PIL images: clamp((x + 1) / 2, 0, 1) * 255, truncated to uint8."""
    from PIL import Image

    arrays = (((pixels.float() + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]
