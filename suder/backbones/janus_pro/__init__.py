"""The ``janus-pro`` backbone: Janus-Pro-1B / 7B on transformers' ``JanusForConditionalGeneration``.

Cheap to import (stdlib, torch and suder only): ``suder backbones`` lists it without importing transformers. The
pieces, each importable on its own:

- ``backbone``: loading a hub id or a folder written by ``save_pretrained`` (dtype, device, LoRA adapter), and
  ``build_janus_pro``, the factory of ``load_backbone("janus-pro", ...)``;
- ``modeling``: ``JanusProBackbone``, the ``UnifiedLMM`` adapter (``.model``, ``.processor``), and
  ``JanusProLora``;
- ``sampling``: the image samplers (``IMAGE_SAMPLERS``) and token draws;
- ``shapes_world``: Janus-Pro's ShapesWorld default (a small Janus-Pro trained here: ``suder run --backbone
  janus-pro`` with no ``--model``), the recipe registered with the backbone (``register(..., shapes_recipe=...)``).

See ``docs/backbones/janus-pro.md``.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from .backbone import DEFAULT_MODEL, build_janus_pro, default_dtype, resolve_device, resolve_dtype, shapes_recipe
from .modeling import JanusProBackbone, JanusProLora

__all__ = ["DEFAULT_MODEL", "JanusProBackbone", "JanusProLora", "build_janus_pro", "default_dtype",
           "resolve_device", "resolve_dtype"]


@hookimpl
def register_backbones(register):
    register("janus-pro", build_janus_pro,
             summary="Janus-Pro-1B/7B (transformers JanusForConditionalGeneration): images, captions, LoRA",
             shapes_recipe=shapes_recipe)
