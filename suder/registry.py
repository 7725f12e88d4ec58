"""The registries the host owns: backbones and rewards, filled by the plugins' ``register_*`` hooks.

Each hook implementation is called with its own ``register`` callback, so a duplicate name can name both
plugins that claim it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import DuplicateNameError, unknown
from .plugins import get_plugin_manager, plugin_info


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    factory: Callable[..., Any]
    summary: str
    plugin: str
    distribution: str


@dataclass(frozen=True)
class RewardSpec:
    name: str
    factory: Callable[..., Any]
    directions: tuple[str, ...]
    summary: str
    plugin: str
    distribution: str = field(default="")


_backbones: dict[str, BackboneSpec] | None = None
_rewards: dict[str, RewardSpec] | None = None


def reset() -> None:
    global _backbones, _rewards
    _backbones = None
    _rewards = None


def _collect(hook_name: str, make: Callable[..., Any]) -> dict[str, Any]:
    pm = get_plugin_manager()
    found: dict[str, Any] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin = impl.plugin_name
        info = plugin_info(plugin)

        def register(name: str, factory: Callable[..., Any], *args: Any, _plugin=plugin, _info=info, **kw):
            if name in found:
                raise DuplicateNameError(
                    f"{hook_name[len('register_') : -1]} '{name}' is registered by both plugin "
                    f"'{found[name].plugin}' and plugin '{_plugin}'; uninstall one or set SUDER_LOAD_PLUGINS."
                )
            found[name] = make(name, factory, *args, plugin=_plugin, distribution=_info.distribution, **kw)

        impl.function(register)
    return found


def backbones() -> dict[str, BackboneSpec]:
    """All registered backbones, by name."""
    global _backbones
    if _backbones is None:
        _backbones = _collect(
            "register_backbones",
            lambda name, factory, summary="", *, plugin, distribution: BackboneSpec(
                name, factory, summary, plugin, distribution
            ),
        )
    return _backbones


def rewards() -> dict[str, RewardSpec]:
    """All registered rewards, by name."""
    global _rewards
    if _rewards is None:
        _rewards = _collect(
            "register_rewards",
            lambda name, factory, directions=("gen", "und"), summary="", *, plugin, distribution: RewardSpec(
                name, factory, tuple(directions), summary, plugin, distribution
            ),
        )
    return _rewards


def get_backbone_spec(name: str) -> BackboneSpec:
    table = backbones()
    if name not in table:
        raise unknown("backbone", name, table)
    return table[name]


def get_reward_spec(name: str) -> RewardSpec:
    table = rewards()
    if name not in table:
        raise unknown("reward", name, table)
    return table[name]


def list_backbones() -> list[BackboneSpec]:
    return [backbones()[k] for k in sorted(backbones())]


def load_backbone(name: str, **kwargs: Any):
    """Build the backbone registered as ``name`` (``kwargs`` go to its factory, e.g. ``model=PATH``)."""
    from .protocol import check_backbone

    model = get_backbone_spec(name).factory(**kwargs)
    check_backbone(model)
    return model
