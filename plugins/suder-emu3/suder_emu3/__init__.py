"""suder-emu3: BAAI's Emu3 as a suder backbone, registered through the ``suder`` entry-point group.

Importing this module is cheap (no transformers, no weights): the factory imports them when a model is built.
"""

from __future__ import annotations

import os
from typing import Any

from suder import hookimpl
from suder.errors import BackboneError

DEFAULT_MODEL = "BAAI/Emu3-Gen-hf"


def build_emu3(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    und_model: str | None = None,
    **settings: Any,
):
    """Factory for ``load_backbone("emu3", model=...)``: a hub id (default ``BAAI/Emu3-Gen-hf``) or a folder written
    by ``save_pretrained``. ``und_model``: a second checkpoint that captions (``BAAI/Emu3-Chat-hf``), trained for
    ``und`` while ``model`` trains for ``gen``; a saved folder brings its own (``und/``). ``settings`` override the
    ``Emu3Settings`` (BAAI's published ones by default, or the ones saved in the folder). ``dtype``: float32 on CPU,
    bfloat16 on GPU unless given."""
    import json

    import torch

    from .backbone import SETTINGS_FILE, UND_FOLDER, Emu3Backbone, settings_from

    model = model or DEFAULT_MODEL
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    saved: dict[str, Any] = {}
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, SETTINGS_FILE)):
        with open(os.path.join(model, SETTINGS_FILE)) as f:
            saved = json.load(f)
    config = settings_from(saved | settings)
    parts = _load_parts(model, getattr(torch, dtype))
    if und_model is None and os.path.isdir(os.path.join(model, UND_FOLDER)):
        und_model = os.path.join(model, UND_FOLDER)
    und = _load_parts(und_model, getattr(torch, dtype), model_only=True)[0] if und_model else None
    return Emu3Backbone(*parts, config, und_model=und).to(device)


def _load_parts(model: str, dtype: Any, model_only: bool = False) -> tuple[Any, Any, Any]:
    """(Emu3ForConditionalGeneration, tokenizer, Emu3ImageProcessor) from a folder or the hub cache, or a one-line
    ``BackboneError`` saying how to get the weights."""
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration, Emu3ImageProcessor

    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1  # a hub id is "org/name"
    if looks_local and not os.path.isdir(model):
        raise BackboneError(f"The Emu3 folder '{model}' does not exist; pass a folder written by save_pretrained "
                            "or a hub id such as BAAI/Emu3-Gen-hf.")
    try:
        built = Emu3ForConditionalGeneration.from_pretrained(model, dtype=dtype)
        if model_only:
            return built.eval(), None, None
        tokenizer = AutoTokenizer.from_pretrained(model)
        image_processor = Emu3ImageProcessor.from_pretrained(model)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "offline" if offline else "here"
        raise BackboneError(
            f"Emu3 weights '{model}' are not available {where}: download them with `hf download {model}` "
            f"on a machine with internet, or pass model=FOLDER ({type(exc).__name__})."
        ) from None
    return built.eval(), tokenizer, image_processor


def shapes_recipe():
    """Emu3's ShapesWorld default (``suder_emu3.shapes_world``), imported when first needed."""
    from .shapes_world import recipe

    return recipe()


@hookimpl
def register_backbones(register):
    register("emu3", build_emu3, summary="BAAI Emu3 (Gen / Chat checkpoints), next-token prediction over VQ codes",
             shapes_recipe=shapes_recipe)
