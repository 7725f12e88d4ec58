"""suder-hello: a third-party backbone and reward, registered through the ``suder`` entry-point group."""

from __future__ import annotations

from suder import hookimpl


def build_hello(model: str | None = None, device: str | None = None):
    """Factory for ``load_backbone("hello", model=...)``; heavy imports stay inside it."""
    from suder.backbones.toy import ToyConfig, ToyUnifiedLM

    class HelloBackbone(ToyUnifiedLM):
        name = "hello"

    if model is not None:
        built = HelloBackbone.from_pretrained(model)
    else:
        built = HelloBackbone(
            ToyConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_caption_tokens=8)
        )
    return built.to(device) if device else built


def hello_recipe():
    """hello's ShapesWorld default (``suder.ShapesRecipe``): ``suder run --backbone hello`` with no data pre-trains
    a base (the factory's model, 300 steps) and self-improves it with the run defaults of ``shapes.yaml``, a preset
    file shipped in this package."""
    from pathlib import Path

    from suder import ShapesRecipe

    return ShapesRecipe(version="v1", pretrain=dict(steps=300), preset=Path(__file__).with_name("shapes.yaml"))


def build_brevity(direction: str, **options):
    """A reward factory: returns ``reward(ctx, samples) -> (B*G,) tensor``."""
    import torch

    def brevity(ctx, samples):
        return -torch.tensor([float(len(t.split())) for t in samples.texts])

    return brevity


@hookimpl
def register_backbones(register):
    register("hello", build_hello, summary="Half-width toy transformer (example plugin)", shapes_recipe=hello_recipe)


@hookimpl
def register_rewards(register):
    register("hello-brevity", build_brevity, ("und",), "Shorter captions score higher (example plugin)")
