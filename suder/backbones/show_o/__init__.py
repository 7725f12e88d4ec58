"""The ``show-o`` backbone: Show-o (showlab, arXiv:2408.12528) carried by suder, since no installable package
exists.

Cheap to import (stdlib, torch and suder only): ``suder backbones`` lists it without importing transformers or
diffusers. The pieces, each importable on its own:

- ``modeling``: ``Showo`` (transformers' ``PhiForCausalLM`` with q/k LayerNorm, on diffusers' ``ModelMixin``),
  loading showlab's ``config.json`` + ``pytorch_model.safetensors`` folders;
- ``magvit``: ``MAGVITv2``, the 13-bit lookup-free image tokenizer;
- ``prompting``: token ids, sequence layouts and omni-attention masks;
- ``sampling``: the MaskGIT sampler and text draws;
- ``clip``: the CLIP-ViT understanding path of the ``show-o-w-clip-vit`` checkpoints;
- ``backbone``: the ``UnifiedLMM`` adapter, ``ShowOBackbone``;
- ``factory``: ``build_show_o`` (loading a release or a saved folder) and ``from_parts``;
- ``shapes_world``: Show-o's ShapesWorld default (a small model and its MAGVIT-v2 trained here), the recipe
  registered with the backbone (``register(..., shapes_recipe=...)``).

See ``docs/backbones/show-o.md``.
"""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl


def build_show_o(**kwargs: Any):
    """Factory of ``load_backbone("show-o", ...)``; see ``suder.backbones.show_o.factory.build_show_o``."""
    from .factory import build_show_o as build

    return build(**kwargs)


def shapes_recipe():
    """Show-o's ShapesWorld recipe (``shapes_world.recipe``), imported when first needed."""
    from .shapes_world import recipe

    return recipe()


def expected_state_dict_shapes(which: str = "showlab/show-o") -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a full-size released model built on the meta device (no weights, no downloads).

    ``which``: ``showlab/show-o`` (also the 512x512 release: same keys), ``showlab/show-o-w-clip-vit`` or
    ``showlab/magvitv2``.
    """
    import torch

    if which == "showlab/magvitv2":
        from .magvit import MAGVITv2 as cls

        kwargs: dict[str, Any] = {}
    elif which in ("showlab/show-o", "showlab/show-o-512x512", "showlab/show-o-w-clip-vit"):
        from .modeling import Showo as cls

        kwargs = {"w_clip_vit": which.endswith("clip-vit"), "num_vq_tokens": 1024 if "512" in which else 256}
    else:
        raise ValueError(
            f"Unknown release {which!r}; use showlab/show-o, showlab/show-o-w-clip-vit or showlab/magvitv2."
        )
    with torch.device("meta"):
        model = cls(**kwargs)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@hookimpl
def register_backbones(register):
    register(
        "show-o",
        build_show_o,
        summary="Show-o 1.3B (Phi-1.5 + MAGVIT-v2): MaskGIT images, autoregressive captions",
        shapes_recipe=shapes_recipe,
    )
