"""Loading Show-o: ``build_show_o``, the factory of ``load_backbone("show-o", ...)``, and ``from_parts``.

A released checkpoint is three downloads (the Show-o transformer, the MAGVIT-v2 tokenizer, Phi-1.5's text
tokenizer), plus a CLIP-ViT tower for the ``show-o-w-clip-vit`` checkpoints; a folder written by
``ShowOBackbone.save_pretrained`` holds all of them and its settings. Configs are resolved before any weights load,
so a missing download is a one-line ``BackboneError`` naming the fix.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ...errors import BackboneError
from .backbone import (
    CLIP_FOLDER,
    DEFAULTS,
    SETTINGS_FILE,
    TOKENIZER_FOLDER,
    VQ_FOLDER,
    ShowOBackbone,
    ShowOSettings,
)
from .clip import DEFAULT_VISION_TOWER, ClipVisionTower
from .magvit import MAGVITv2
from .modeling import CheckpointNotFound, Showo, resolve_checkpoint


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if str(value) not in names:
        raise BackboneError(f"Unknown dtype '{value}'; use one of {', '.join(names)}.")
    return names[str(value)]


def _missing(what: str, name: str, reason: str) -> BackboneError:
    return BackboneError(
        f"The {what} '{name}' is not available here ({reason}); download it on a connected machine "
        f"(`hf download {name}`) or pass a local folder."
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, padding_side="left")
    except (OSError, ValueError) as exc:
        raise _missing("tokenizer", name, type(exc).__name__) from exc


def build_show_o(
    model: str | None = None,
    vq_model: str | None = None,
    tokenizer: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    vision_tower: str | None = None,
    **settings: Any,
) -> ShowOBackbone:
    """Load Show-o: ``model`` (default ``showlab/show-o``; a folder from ``save_pretrained`` brings its own VQ
    model, tokenizer, CLIP vision tower and settings), ``vq_model`` (default ``showlab/magvitv2``),
    ``tokenizer`` (default ``microsoft/phi-1_5``), ``dtype`` (default float32), ``device`` (default cuda when
    available), ``vision_tower`` (CLIP-ViT checkpoints only; default ``openai/clip-vit-large-patch14-336``) and
    the ``ShowOSettings`` fields (``guidance_scale``, ``steps``, ``schedule``, ``max_caption_tokens``,
    ``caption_prompt``, ``caption_logp_vocab``). Weights must be local or in the Hugging Face cache when
    offline."""
    valid = {f.name for f in fields(ShowOSettings)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise BackboneError(
            f"Unknown show-o option(s) {unknown}; valid: dtype, device, model, tokenizer, vision_tower, vq_model, "
            f"{', '.join(sorted(valid))}."
        )
    model = str(model or DEFAULTS["model"])
    saved = Path(model) / SETTINGS_FILE
    stored: dict[str, Any] = {}
    if saved.is_file():
        stored = {k: v for k, v in json.loads(saved.read_text()).items() if k in valid}
        vq_model = vq_model or str(Path(model) / VQ_FOLDER)
        tokenizer = tokenizer or str(Path(model) / TOKENIZER_FOLDER)
        if (Path(model) / CLIP_FOLDER).is_dir():
            vision_tower = vision_tower or str(Path(model) / CLIP_FOLDER)
    vq_model, tokenizer = str(vq_model or DEFAULTS["vq_model"]), str(tokenizer or DEFAULTS["tokenizer"])
    chosen = ShowOSettings(**(stored | {k: v for k, v in settings.items() if v is not None}))
    configs = {}
    for what, name in (("Show-o model", model), ("MAGVIT-v2 model", vq_model)):  # fail before loading GBs
        try:
            configs[what] = resolve_checkpoint(name)[0]
        except CheckpointNotFound as exc:
            raise _missing(what, name, exc.reason) from exc
    w_clip_vit = bool(json.loads(configs["Show-o model"].read_text()).get("w_clip_vit", False))
    tok = load_tokenizer(tokenizer)
    torch_dtype = _dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vision = None
    if w_clip_vit:  # showlab's CLIPVisionTower loads it by name too: it is not part of the Show-o checkpoint
        vision_tower = str(vision_tower or DEFAULT_VISION_TOWER)
        try:
            vision = ClipVisionTower.from_pretrained(vision_tower, torch_dtype=torch_dtype, device=device)
        except (OSError, ValueError) as exc:
            raise _missing("CLIP vision tower", vision_tower, type(exc).__name__) from exc
    try:
        showo = Showo.from_pretrained(model, torch_dtype=torch_dtype, device=device)
        vq = MAGVITv2.from_pretrained(vq_model, torch_dtype=torch_dtype, device=device)
        return ShowOBackbone(showo, vq, tok, chosen, vision)
    except ValueError as exc:
        raise BackboneError(f"Cannot load show-o from '{model}': {exc}.") from exc


def from_parts(
    showo: Showo, vq: MAGVITv2, tokenizer: Any, vision: ClipVisionTower | None = None, **settings: Any
) -> ShowOBackbone:
    """The backbone from already-built parts (tests, notebooks): no files, no downloads; ``vision`` for
    CLIP-ViT models."""
    return ShowOBackbone(showo, vq, tokenizer, ShowOSettings(**settings), vision)
