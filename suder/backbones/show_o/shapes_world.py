"""Show-o's ShapesWorld default: a small model of the released architecture, trained here from scratch.

``suder pretrain --backbone show-o`` and ``suder run --backbone show-o`` (no ``--model``) use ``recipe()``
through ``suder.pretrain``'s one mechanism (see its docstring). The parts are the classes that load showlab's
checkpoints (``Showo``, ``MAGVITv2``) with small sizes, and a text tokenizer of the same kind as Phi-1.5's:

- **Text tokenizer**: a byte-level BPE (GPT-2 style, as Phi-1.5's) trained in memory on the ShapesWorld
  grammar, so every word is one token; ``<|endoftext|>`` is id 0 and is bos = eos, as in Show-o. Show-o's
  ``[PAD]`` and nine task tokens follow, then the image codes, then the mask token (``docs/backbones/show-o.md``,
  "Token layout").
- **MAGVIT-v2 tokenizer** (``SHAPES_VQ``): 32 channels, one ResNet block per level, four levels (stride 8; the
  release has five, stride 16, but at 32 px that leaves a 2 x 2 grid on which GroupNorm erases scenes of four
  identical objects), 8 LFQ bits (256 codes). A 32 px image becomes 4 x 4 codes, 2 x 2 per quadrant. Trained by
  ``train_tokenizer`` (1200 steps of 8 images, Adam lr 2e-3, short warm-up, cosine), **not** with MAGVIT-v2's
  objective but as Janus-Pro's ShapesWorld VQ is (``suder.pretrain.patch_clusters``): the
  codes are **clusters of image patches** (ImageGPT's tokens are k-means clusters of colours; Chen et al. 2020,
  sec. 3.1). At stride 8, ShapesWorld has 73 distinct 8 x 8 patches (empty, or a quarter of one of 18 objects),
  so patch i gets code i; the encoder learns to pick each patch's code (cross-entropy over LFQ's code
  distribution softmax(2 z . c), so that sign(z) spells the code) and the decoder to draw the scene from the
  codes' -1/+1 bits (L1 + L2). Why not MAGVIT-v2's own objective (``method="ste"``: L1 + L2 through sign(z)
  passed straight through, Yu et al. 2023, arXiv:2310.05737 section 3.1, with Open-MAGVIT2's 0.25 commitment and
  0.1 entropy losses): at this size it reconstructed few scenes the judge could read, and without the auxiliary
  losses its codes were not local (one code stood for the empty patch and for quarters of several objects,
  depending on the rest of the scene), which the transformer then could not learn to draw; with patch clusters
  the judge reads the reconstructions (``reconstruction_accuracy``; the comparison is in docs/results.md).
- **Show-o transformer** (``SHAPES_LLM``): Phi with q/k LayerNorm, 4 layers of width 128, 16 image tokens.
  ``suder.pretrain.pretrain`` trains it through the protocol's two log-prob methods, which for Show-o are its
  mixed objective: mask-token prediction of the image (``logp_image_given_text`` with a random
  ``remask_ratio`` per step drawn from Show-o's cosine mask schedule, ``image_logp_options``) and next-token
  prediction of the caption (``logp_text_given_image``).

Sampling settings saved with the base: 8 MaskGIT steps for the 16 image tokens, captions up to 24 tokens,
guidance ``SHAPES_GUIDANCE`` (none).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

SHAPES_LLM = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=64,
    max_text_len=20,
    codebook_size=256,
    num_vq_tokens=16,
)
SHAPES_VQ = dict(
    ch=32,
    encoder_ch_mult=(1, 1, 2, 2),
    encoder_num_res_blocks=(1, 1, 1, 1),
    decoder_ch_mult=(1, 1, 2, 2),
    decoder_num_res_blocks=(1, 1, 1, 1),
    z_channels=8,
)
SHAPES_GUIDANCE = 0.0
SHAPES_SETTINGS = dict(guidance_scale=SHAPES_GUIDANCE, steps=8, max_caption_tokens=24)


# --------------------------------------------------------------------------------------------- text tokenizer
def text_tokenizer() -> Any:
    """A byte-level BPE tokenizer whose vocabulary holds every ShapesWorld word, with and without a leading
    space, as one token; ``<|endoftext|>`` (id 0) is bos, eos and unk. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ...worlds import shapes

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,  # an upper bound: merging stops once every word is a single token
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = list(shapes.VOCAB_WORDS)
    tok.train_from_iterator([" ".join(words), *(f"{w} {w}" for w in words)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


# --------------------------------------------------------------------------------------------- MAGVIT-v2 training
def _pixels(images: list[Any]) -> torch.Tensor:
    from .magvit import image_to_tensor

    return torch.stack([image_to_tensor(im, 32) for im in images])


def lfq_losses(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(straight-through quantized z, commitment loss, entropy loss) of (B, C, H, W) latents; ``codebook``
    (K, C) of -1/+1 rows (``LFQuantizer.embedding``). See the module docstring for the formulas."""
    q = torch.where(z > 0, 1.0, -1.0)
    quantized = z + (q - z).detach()
    commit = F.mse_loss(z, q)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B H W, C)
    probs = torch.softmax(2 * flat @ codebook.t(), -1)  # (B H W, K)
    per_code = -(probs * torch.log(probs + 1e-5)).sum(-1).mean()
    mean = probs.mean(0)
    batch = -(mean * torch.log(mean + 1e-5)).sum()
    return quantized, commit, per_code - batch


def train_tokenizer(
    vq: Any,
    *,
    steps: int = 1200,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    method: str = "clusters",
    commit_weight: float = 0.0,
    entropy_weight: float = 0.0,
    callback: Callable[[dict], None] | None = None,
) -> list[float]:
    """Train ``vq`` (a ``MAGVITv2``) on rendered ShapesWorld scenes; returns the losses. Deterministic for a
    seed. ``method``: ``"clusters"`` (the recipe: codes are clusters of image patches, see the module docstring)
    or ``"ste"`` (MAGVIT-v2's straight-through sign quantisation; ``commit_weight`` / ``entropy_weight`` turn on its
    auxiliary losses, 0.25 / 0.1 in Open-MAGVIT2)."""
    from ...pretrain import image_patches, patch_clusters
    from ...worlds import shapes

    if method not in ("clusters", "ste"):
        raise ValueError(f"method must be 'clusters' or 'ste', got {method!r}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    stride = vq.downsample_factor
    centres = patch_clusters(vq.codebook_size, stride, seed=rng.randrange(2**31)) if method == "clusters" else None
    vq.train().requires_grad_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    codebook = vq.quantize.embedding
    losses = []
    for step in range(steps):
        scenes = shapes.sample_scenes(batch_size, seed=rng.randrange(2**31))
        x = _pixels([shapes.render(s) for s in scenes])
        z = vq.encoder(x)
        if centres is not None:  # each patch's cluster is its code: pick it (LFQ's code distribution), draw it
            target = torch.cdist(image_patches(x, stride), centres).argmin(-1)  # (B h w,), the codes' raster order
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            aux = F.cross_entropy(2 * flat @ codebook.t(), target)
            quantized = codebook[target].view(len(x), z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        elif commit_weight or entropy_weight:
            quantized, commit, entropy = lfq_losses(z, codebook)
            aux = commit_weight * commit + entropy_weight * entropy
        else:
            quantized, aux = z + (torch.where(z > 0, 1.0, -1.0) - z).detach(), 0.0
        recon = vq.decoder(quantized)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback:
            callback({"step": step + 1, "total_steps": steps, "loss": losses[-1]})
    vq.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def reconstruction_accuracy(vq: Any, num: int = 400, seed: int = 999) -> dict[str, float]:
    """``suder.pretrain.reconstruction_accuracy`` through the MAGVIT-v2 tokenizer ``vq`` (``get_code``,
    ``decode_code``): how often the judge reads a held-out scene, encoded and decoded, as the scene itself."""
    from ...pretrain import reconstruction_accuracy as accuracy
    from .magvit import tensor_to_images

    return accuracy(lambda images: vq.get_code(_pixels(images)), lambda codes: tensor_to_images(vq.decode_code(codes)),
                    num, seed)


# --------------------------------------------------------------------------------------------- the recipe
def build_shapes_base(
    seed: int = 0,
    callback: Callable[[dict], None] | None = None,
    *,
    llm: dict[str, Any] | None = None,
    vq: dict[str, Any] | None = None,
    tokenizer_steps: int = 1200,
    tokenizer_batch_size: int = 8,
    **settings: Any,
):
    """An untrained Show-o at ShapesWorld scale whose MAGVIT-v2 tokenizer is already trained (``callback``
    sees its steps); ``llm`` / ``vq`` override ``SHAPES_LLM`` / ``SHAPES_VQ`` (tests use tiny sizes), and
    ``settings`` the saved sampling settings (``SHAPES_SETTINGS``)."""
    from .factory import from_parts
    from .magvit import MAGVITv2
    from .modeling import Showo

    tokenizer = text_tokenizer()
    llm_cfg, vq_cfg = {**SHAPES_LLM, **(llm or {})}, {**SHAPES_VQ, **(vq or {})}
    torch.manual_seed(seed)
    tokenizer_model = MAGVITv2(**vq_cfg)
    start = time.perf_counter()
    train_tokenizer(tokenizer_model, steps=tokenizer_steps, batch_size=tokenizer_batch_size, seed=seed,
                    callback=callback)
    torch.manual_seed(seed)
    n = len(tokenizer)
    showo = Showo(llm_vocab_size=n, vocab_size=n + 10 + llm_cfg["codebook_size"] + 1, **llm_cfg)
    model = from_parts(showo, tokenizer_model, tokenizer, **{**SHAPES_SETTINGS, **settings})
    model.tokenizer_seconds = time.perf_counter() - start
    return model


def image_logp_options(rng: random.Random) -> dict[str, Any]:
    """Show-o's pre-training masks a fraction cos(pi/2 t), t ~ U(0, 1), of the image tokens and predicts them
    (``training/train.py``'s ``mask_or_random_replace_tokens`` with the cosine schedule); one ratio per step
    here."""
    return {"remask_ratio": max(1e-3, math.cos(math.pi / 2 * rng.random())), "remask_seed": rng.randrange(2**31)}


def recipe():
    """Show-o's ShapesWorld base recipe (``suder.pretrain.ShapesRecipe``)."""
    from ...pretrain import SHIPPED, ShapesRecipe

    return ShapesRecipe(
        build=build_shapes_base,
        version="v3",
        pretrain=dict(steps=1000, batch_size=24, lr=1e-3, warmup_steps=100),
        image_logp_options=image_logp_options,
        preset="show-o",  # suder/presets/show-o.yaml: lr 3e-5, captions scored by the frozen base (why: there)
        shipped=SHIPPED / "show-o",  # suder/bases/show-o: the base of docs/results.md
    )
