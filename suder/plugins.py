"""Plugin loading: the pluggy ``PluginManager``, entry points, ``SUDER_LOAD_PLUGINS`` and isolation.

Entry points of the ``suder`` group from the ``suder`` distribution itself (the built-ins) always load.
Third-party entry points load unless ``SUDER_LOAD_PLUGINS`` says otherwise:

- unset: all of them;
- empty string: none;
- ``a,b``: only the entry points (or distributions) named ``a`` and ``b``.

A plugin whose import fails is named in a ``SuderPluginWarning`` and skipped; the others keep working.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass

import pluggy

from . import hookspecs

GROUP = "suder"
BUILTIN_DISTRIBUTION = "suder"


class SuderPluginWarning(UserWarning):
    """A plugin failed to load and was skipped."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool


_pm: pluggy.PluginManager | None = None
_info: dict[str, PluginInfo] = {}


def _allowed(ep_name: str, dist_name: str) -> bool:
    raw = os.environ.get("SUDER_LOAD_PLUGINS")
    if raw is None:
        return True
    wanted = {p.strip() for p in raw.split(",") if p.strip()}
    return ep_name in wanted or dist_name in wanted


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        builtin = dist == BUILTIN_DISTRIBUTION
        if not builtin and not _allowed(ep.name, dist):
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            warnings.warn(
                f"suder plugin '{ep.name}' from {dist} failed to load and was skipped: {type(exc).__name__}: {exc}",
                SuderPluginWarning,
                stacklevel=2,
            )
            continue
        _info[ep.name] = PluginInfo(ep.name, dist, version, builtin)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def plugin_info(name: str) -> PluginInfo:
    return _info.get(name, PluginInfo(name, "(registered in code)", "", False))


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object in-process (tests, notebooks); same hooks as an entry point."""
    get_plugin_manager().register(plugin, name=name)
    from . import registry

    registry.reset()


def unregister_plugin(name: str) -> None:
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    from . import registry

    registry.reset()


def reset() -> None:
    """Forget loaded plugins (re-read entry points and ``SUDER_LOAD_PLUGINS`` on next use)."""
    global _pm
    _pm = None
    _info.clear()
    from . import registry

    registry.reset()
