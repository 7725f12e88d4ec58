"""suder: self-improving unified multimodal models with dual self-rewards.

Public API only; importing suder does not import transformers or load weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import SuderError
from .hookspecs import hookimpl
from .protocol import ImageSamples, TextSamples, TokenLogProbs, UnifiedLMM
from .registry import list_backbones, load_backbone

if TYPE_CHECKING:  # imported on first use (``__getattr__`` below)
    from .pretrain import ShapesRecipe

__version__ = "0.1.0"

__all__ = [
    "ImageSamples",
    "ShapesRecipe",
    "SuderError",
    "TextSamples",
    "TokenLogProbs",
    "UnifiedLMM",
    "hookimpl",
    "list_backbones",
    "load_backbone",
    "train",
    "pretrain",
]


def train(model: Any = None, /, algo: str | None = None, **config: Any):
    """Self-improve ``model`` (a backbone name or any ``UnifiedLMM``; default ``toy``) with dual self-rewards.

    Only what you pass counts: ``train(config_file="run.yaml")`` trains the backbone and algorithm the file names.
    See ``docs/python-api.md``; returns a ``TrainResult`` with the metrics and output paths.
    """
    from .trainer import train as _train

    return _train(model, algo, **config)


def pretrain(model: Any = "toy", /, **options: Any):
    """Supervised pre-training on paired ShapesWorld data (maximises both log-prob methods)."""
    from .pretrain import pretrain as _pretrain

    return _pretrain(model, **options)


def __getattr__(name: str) -> Any:
    if name == "ShapesRecipe":  # the ShapesWorld recipe a backbone registers (suder.pretrain; docs/writing-a-plugin.md)
        from .pretrain import ShapesRecipe

        return ShapesRecipe
    raise AttributeError(f"module 'suder' has no attribute '{name}'")
