"""Plugin loading: the pluggy ``PluginManager``, entry points, ``SUDER_LOAD_PLUGINS`` and isolation.

Entry points of the ``suder`` group from the ``suder`` distribution itself (the built-ins) always load, first.
Third-party entry points load unless ``SUDER_LOAD_PLUGINS`` says otherwise:

- unset: all of them;
- empty string: none;
- ``a,b``: only the entry points (or distributions) named ``a`` and ``b``.

Isolation: a plugin that fails to import, implements a hook name suder does not know (``register_backbone``
for ``register_backbones``), or implements no hook at all is named in a ``SuderPluginWarning`` and skipped; so is
a plugin whose hook raises (``suder.registry``). The others keep working, and ``failures()`` remembers each
skipped plugin with its error for ``suder backbones``. A third-party entry point with the name of another
distribution's entry point (``toy``) is a ``DuplicateNameError`` naming both distributions, never a silent
replacement.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import DuplicateNameError, PluginError, closest

GROUP = "suder"
BUILTIN_DISTRIBUTION = "suder"
HOOKS = tuple(sorted(n for n in dir(hookspecs) if n.startswith("register_")))


class SuderPluginWarning(UserWarning):
    """A plugin failed to load, or one of its hooks failed, and it was skipped."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool


@dataclass(frozen=True)
class PluginFailure:
    """A skipped plugin: its name, where it comes from, and the one-line error."""

    plugin: str
    distribution: str
    version: str
    error: str


_pm: pluggy.PluginManager | None = None
_info: dict[str, PluginInfo] = {}
_failures: dict[str, PluginFailure] = {}
_generation = 0  # bumped whenever the set of plugins changes; ``suder.registry`` rebuilds its tables when it moves


def generation() -> int:
    """A number that changes whenever plugins are registered, unregistered or reset: the registries built from
    the hooks (``suder.registry``) compare it with the one they were built at, so this module never calls them."""
    return _generation


def _changed() -> None:
    global _generation
    _generation += 1


def _allowed(ep_name: str, dist_name: str) -> bool:
    raw = os.environ.get("SUDER_LOAD_PLUGINS")
    if raw is None:
        return True
    wanted = {p.strip() for p in raw.split(",") if p.strip()}
    return ep_name in wanted or dist_name in wanted


def hook_problem(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """Why a registered plugin is unusable (an unknown hook name, or no hook at all), or ``None``."""
    callers = pm.get_hookcallers(plugin) or []
    for caller in callers:
        if not caller.has_spec():
            hint = closest(caller.name, HOOKS)
            suggestion = f" (did you mean '{hint}'?)" if hint else ""
            return f"it implements an unknown hook '{caller.name}'{suggestion}; suder's hooks are {', '.join(HOOKS)}"
    if not callers:
        return f"it implements no suder hook; mark {' or '.join(HOOKS)} with @suder.hookimpl"
    return None


def record_failure(plugin: str, what: str, error: str) -> None:
    """Remember, and warn about, a plugin that was skipped: ``what`` went wrong (``failed to load``), ``error``
    is the one-line reason."""
    info = plugin_info(plugin)
    _failures[plugin] = PluginFailure(plugin, info.distribution, info.version, f"{what}: {error}")
    warnings.warn(
        f"suder plugin '{plugin}' from {info.distribution} {what} and was skipped: {error}",
        SuderPluginWarning,
        stacklevel=3,
    )


def forget_failure(plugin: str) -> None:
    _failures.pop(plugin, None)


def failures() -> list[PluginFailure]:
    """Plugins skipped so far (import errors, unknown hooks, and hooks that raised), by name."""
    return [_failures[k] for k in sorted(_failures)]


def _entry_points() -> list:
    """The group's entry points, the built-ins first, so a third party can never take a built-in's name."""
    eps = list(importlib.metadata.entry_points(group=GROUP))
    return sorted(eps, key=lambda ep: ep.dist is None or ep.dist.name != BUILTIN_DISTRIBUTION)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        builtin = dist == BUILTIN_DISTRIBUTION
        if not builtin and not _allowed(ep.name, dist):
            continue
        if ep.name in _info or pm.has_plugin(ep.name):
            other = _info[ep.name].distribution if ep.name in _info else "(registered in code)"
            if other == dist:  # the same distribution seen twice on sys.path: the first one wins
                continue
            raise DuplicateNameError(
                f"suder plugin '{ep.name}' is provided by both {other} and {dist}; uninstall one, or set "
                f"SUDER_LOAD_PLUGINS to the plugins you want."
            )
        _info[ep.name] = PluginInfo(ep.name, dist, version, builtin)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            record_failure(ep.name, "failed to load", f"{type(exc).__name__}: {exc}")
            continue
        problem = hook_problem(pm, plugin)
        if problem is not None:
            pm.unregister(plugin)
            record_failure(ep.name, "failed to load", problem)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        try:
            _load_entry_points(pm)
        except DuplicateNameError:
            _info.clear()
            _failures.clear()
            raise
        _pm = pm
    return _pm


def plugin_info(name: str) -> PluginInfo:
    return _info.get(name, PluginInfo(name, "(registered in code)", "", False))


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object in-process (tests, notebooks); same hooks as an entry point.

    Raises ``PluginError`` at once for an unknown hook name, and ``DuplicateNameError`` for a taken name.
    """
    pm = get_plugin_manager()
    if pm.has_plugin(name) or name in _info:
        raise DuplicateNameError(
            f"suder plugin '{name}' is already registered (from {plugin_info(name).distribution}); pick another name."
        )
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # e.g. a hook argument the spec does not have
        raise PluginError(f"Plugin '{name}' cannot be registered: {exc}.") from None
    problem = hook_problem(pm, plugin)
    if problem is not None:
        pm.unregister(plugin)
        raise PluginError(f"Plugin '{name}' cannot be registered: {problem}.")
    _changed()


def unregister_plugin(name: str) -> None:
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    forget_failure(name)
    _changed()


def reset() -> None:
    """Forget loaded plugins (re-read entry points and ``SUDER_LOAD_PLUGINS`` on next use)."""
    global _pm
    _pm = None
    _info.clear()
    _failures.clear()
    _changed()
