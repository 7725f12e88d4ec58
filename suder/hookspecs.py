"""Hook specifications for suder plugins (pluggy project name ``suder``).

A plugin is a module registered under the ``suder`` entry-point group that implements any of these hooks.
The host owns the ``register`` callback; plugins only call it::

    from suder import hookimpl

    @hookimpl
    def register_backbones(register):
        register("hello", build_hello, summary="A small toy backbone")

Built-in backbones and rewards use exactly this path (see ``[project.entry-points.suder]``). A hook that raises
skips its plugin (named in a warning and in ``suder backbones``); a function marked ``@hookimpl`` whose name is not
one of the hooks below makes the plugin fail at load, with the closest hook name.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("suder")
hookimpl = pluggy.HookimplMarker("suder")


@hookspec
def register_backbones(register):
    """Register backbones: ``register(name, factory, summary="...", shapes_recipe=None)``.

    ``factory(**kwargs)`` returns an object satisfying ``suder.UnifiedLMM``. Keep imports of heavy
    libraries (transformers, weights) inside the factory so ``suder backbones`` stays fast.

    ``shapes_recipe`` declares the backbone's embedded ShapesWorld default (what ``suder run --backbone NAME``
    pre-trains and self-improves with no data): a ``suder.ShapesRecipe``, or a callable with no arguments returning
    one, called when first needed (so a recipe module with heavy imports stays out of ``suder backbones``). Its
    fields are described in ``suder.pretrain``; ``suder.testing.check_shapes_recipe`` checks it.
    """


@hookspec
def register_rewards(register):
    """Register rewards: ``register(name, factory, directions=("gen", "und"), summary="...", needs_reference=False)``.

    ``factory(direction, **options)`` returns ``reward(ctx, samples) -> Tensor`` of shape (B*G,), where ``ctx`` is a
    ``suder.rewards.RewardContext`` (``ctx.scorer`` is the model that scores, ``ctx.reference`` the frozen
    reference) and ``samples`` the ``ImageSamples`` (direction ``gen``) or ``TextSamples`` (``und``) of the
    rollout. Options are the run's reward settings (``reduction``, ``consensus_lambda``, ...); ignore the others.

    ``needs_reference`` says whether the reward reads ``ctx.reference``, so the trainer keeps a frozen copy of the
    initial model for it: ``True``, ``False`` (the default), or a callable of the run's options (the resolved
    config as a dict, e.g. ``lambda o: o.get("consensus_source") == "reference"``) returning a bool. A reward that
    reads ``ctx.reference`` without declaring it gets a ``ConfigError`` in runs that keep no reference.
    """
