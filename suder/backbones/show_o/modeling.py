"""Show-o's language core (``Showo``) on diffusers' ``ModelMixin``/``ConfigMixin``, loading showlab's folders.

Reference: Xie et al. 2024, "Show-o: One Single Transformer to Unify Multimodal Understanding and Generation"
(arXiv:2408.12528); the class layout, key names and token ids are those of showlab/Show-o's
``models/modeling_showo.py`` and ``models/phi.py`` and of the released checkpoints' ``config.json``.

``Showo.showo`` is transformers' ``PhiForCausalLM`` with ``qk_layernorm=True``: its parameter names are
exactly the released ``showo.*`` keys, and its attention (per-head q/k LayerNorm before a partial GPT-NeoX
RoPE on 32 of 64 dims, parallel attention + MLP block, lm_head with bias) is the one Show-o trained.
Departures from showlab's code, on purpose:

- No Hub call at construction: showlab's ``Showo.__init__`` fetches the Phi-1.5 *config* from
  ``llm_model_path``; the Phi-1.5 sizes are our config's defaults instead, so the released ``config.json``
  (which holds no sizes) builds the full model offline, and tiny test configs override the sizes.
- Token layout from the config: ``pad = llm_vocab_size``, then soi, eoi, sov, eov, t2i, mmu, t2v, v2v, lvg,
  image code ``c`` at ``llm_vocab_size + num_new_special_tokens + c``, mask token ``vocab_size - 1``
  (``num_new_special_tokens`` is 10 and ``max_text_len`` 128, the values of showlab's demo YAMLs).
- Checkpoint files: diffusers' ``ModelMixin`` looks for ``diffusion_pytorch_model.*``; showlab's folders hold
  ``pytorch_model.safetensors`` (their ``models/modeling_utils.py``), so ``ShowlabCheckpoint`` reads and writes
  that name itself: build on the meta device, load strictly (a missing key is an error, an unexpected one is ignored).
- Attention masks are boolean "may attend" tensors (SDPA); showlab's additive -9.2e18 float masks give the
  same probabilities because no row is ever fully blocked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"


class CheckpointNotFound(FileNotFoundError):
    """A model id or folder that holds no showlab-style checkpoint (here or in the Hugging Face cache)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def resolve_checkpoint(
    name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> tuple[Path, Path]:
    """(config.json, weights file) of a local folder or a Hub id (the Hub cache only when
    HF_HUB_OFFLINE=1)."""
    folder = Path(name)
    if folder.is_dir():
        config = folder / CONFIG_NAME
        for weights in (folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME):
            if config.is_file() and weights.is_file():
                return config, weights
        raise CheckpointNotFound(str(name), f"the folder has no {CONFIG_NAME} + {WEIGHTS_NAME}")
    if str(name).startswith((".", "/", "~")) or str(name).count("/") != 1:
        raise CheckpointNotFound(str(name), "no such folder")
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(str(name), filename, revision=revision, cache_dir=cache_dir))

    try:
        config = fetch(CONFIG_NAME)
    except Exception as exc:  # offline miss, unknown repo, no network: all mean "not available here"
        raise CheckpointNotFound(str(name), type(exc).__name__) from exc
    try:
        return config, fetch(WEIGHTS_NAME)
    except Exception as first:
        try:
            return config, fetch(LEGACY_WEIGHTS_NAME)
        except Exception:
            raise CheckpointNotFound(str(name), f"{WEIGHTS_NAME} is missing ({type(first).__name__})") from first


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    return torch.load(str(path), map_location=device, weights_only=True)


class ShowlabCheckpoint:
    """``from_pretrained``/``save_pretrained`` over showlab's file names (``config.json`` +
    ``pytorch_model.safetensors``, fp32, metadata ``{"format": "pt"}``)."""

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
    ):
        """Build on the meta device, then load ``config.json`` + weights of a folder or Hub id (strict on
        missing keys); ``device``: where the weights are read to (default CPU)."""
        from accelerate import init_empty_weights

        config_file, weights_file = resolve_checkpoint(name, revision=revision, cache_dir=cache_dir)
        config = cls.load_config(str(config_file.parent))
        with init_empty_weights():  # parameters on meta, buffers (rotary, LFQ tables) real
            model = cls.from_config(config)
        state = read_weights(weights_file, device or "cpu")
        expected = model.state_dict().keys()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{weights_file} lacks {len(missing)} key(s) of {cls.__name__}, e.g. {missing[:3]}")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            logger.warning(
                "ignoring %d unexpected key(s) in %s, e.g. %s", len(unexpected), weights_file, unexpected[:3]
            )
        model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
        # the buffers built outside the file, and the dtype; torch's own ``to``: diffusers' override warns about
        # "modules that should be kept in float32" whenever a dtype is given, even when there are none
        nn.Module.to(model, device=device, dtype=torch_dtype)
        model.register_to_config(_name_or_path=str(name))
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, **_: Any) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        self.save_config(str(folder))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})


class Showo(ShowlabCheckpoint, ModelMixin, ConfigMixin):
    """Show-o's transformer: ``showo`` (Phi-1.5 with q/k LayerNorm) and, for CLIP-ViT checkpoints,
    ``mm_projector``.

    The first seven arguments are the keys of showlab's ``config.json``; the rest default to Phi-1.5's sizes
    and the demo YAMLs' token layout (see the module docstring). ``llm_model_path`` and ``load_from_showo``
    are kept for compatibility and not used: nothing is fetched.
    """

    @register_to_config
    def __init__(
        self,
        w_clip_vit: bool = False,
        vocab_size: int = 58498,
        llm_vocab_size: int = 50295,
        llm_model_path: str = "microsoft/phi-1_5",
        codebook_size: int = 8192,
        num_vq_tokens: int = 256,
        load_from_showo: bool = True,
        mask_token_id: int | None = None,
        num_new_special_tokens: int = 10,
        max_text_len: int = 128,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        intermediate_size: int = 8192,
        hidden_act: str = "gelu_new",
        layer_norm_eps: float = 1e-5,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        clip_hidden_size: int = 1024,
    ):
        super().__init__()
        from transformers import PhiConfig, PhiForCausalLM

        layout = llm_vocab_size + num_new_special_tokens + codebook_size + 1
        if vocab_size != layout:
            raise ValueError(
                f"vocab_size {vocab_size} != llm_vocab_size {llm_vocab_size} + num_new_special_tokens "
                f"{num_new_special_tokens} + codebook_size {codebook_size} + 1 mask token = {layout}"
            )
        if mask_token_id is not None and mask_token_id != vocab_size - 1:
            raise ValueError(f"mask_token_id must be vocab_size - 1 = {vocab_size - 1}, got {mask_token_id}")
        self.register_to_config(mask_token_id=vocab_size - 1)
        phi = PhiConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            max_position_embeddings=max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": rope_theta,
                "partial_rotary_factor": partial_rotary_factor,
            },
            qk_layernorm=True,  # showlab's phi.py forces it on
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        phi._attn_implementation = "sdpa"  # boolean omni-attention masks; see the module docstring
        self.showo = PhiForCausalLM(phi)
        if w_clip_vit:
            self.mm_projector = nn.Sequential(
                nn.Linear(clip_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )

    # ------------------------------------------------------------------ dtype
    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` and device moves, with the rotary frequencies kept in
        float32: transformers' ``PhiRotaryEmbedding`` computes its angles in float32 from ``inv_freq``, but a
        cast rounds ``inv_freq`` itself (in bfloat16 by up to 0.21 rad at position 1154, the last one of a
        512 px sequence); showlab's model keeps them in float32 whatever the weights' dtype."""
        super()._apply(fn, recurse)
        rotary = self.showo.model.rotary_emb
        for name in ("inv_freq", "original_inv_freq"):
            buffer = getattr(rotary, name)
            if buffer.dtype != torch.float32:
                fresh, _ = type(rotary).compute_default_rope_parameters(rotary.config, device=buffer.device)
                setattr(rotary, name, fresh.float())
        return self

    # ------------------------------------------------------------------ token layout
    @property
    def image_offset(self) -> int:
        """Token id of image code 0 (50305 for the released models)."""
        return self.config.llm_vocab_size + self.config.num_new_special_tokens

    def _mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean (B, 1, Lq, Lk) "may attend" -> what the attention implementation wants."""
        if mask is None or self.showo.config._attn_implementation != "eager":
            return mask
        dtype = self.showo.lm_head.weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids, or (B, L, hidden) ``inputs_embeds`` (the CLIP-ViT path) -> (B, L, hidden) final-LayerNorm
        outputs. Positions are absolute (pads included).

        ``attention_mask``: boolean (B, 1, L, L_past + L), True where a row may attend; ``None`` is causal.
        """
        out = self.showo.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=self._mask(attention_mask),
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 logits of vocabulary columns ``[start, stop)`` only: (..., stop - start).

        Slicing the head before the matmul keeps 8192 image columns (or 50295 text columns) instead of 58498.
        """
        weight, bias = self.showo.lm_head.weight[start:stop], self.showo.lm_head.bias[start:stop]
        return nn.functional.linear(hidden, weight, bias).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary float32 logits (B, L, vocab_size), as showlab's ``Showo.forward`` without
        labels."""
        return self.head(self.hidden_states(input_ids, attention_mask))
