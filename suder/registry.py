"""The registries the host owns: backbones and rewards, filled by the plugins' ``register_*`` hooks.

Each hook implementation is called with its own ``register`` callback, so a duplicate name can name both
plugins (and distributions) that claim it, and a hook that raises skips only its own plugin.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import BackboneError, DuplicateNameError, unknown
from .plugins import generation, get_plugin_manager, plugin_info, record_failure


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    factory: Callable[..., Any]
    summary: str
    plugin: str
    distribution: str
    # a suder.ShapesRecipe, or a callable with no arguments returning one; see hookspecs.register_backbones
    shapes_recipe: Any = None


@dataclass(frozen=True)
class RewardSpec:
    name: str
    factory: Callable[..., Any]
    directions: tuple[str, ...]
    summary: str
    plugin: str
    distribution: str = field(default="")
    # bool, or a callable of the run's options (``Config.to_dict()``) returning bool; see hookspecs.register_rewards
    needs_reference: bool | Callable[[dict[str, Any]], bool] = False


# (plugins.generation() when built, table); rebuilt when a plugin is registered, unregistered or plugins reset
_backbones: tuple[int, dict[str, BackboneSpec]] | None = None
_rewards: tuple[int, dict[str, RewardSpec]] | None = None


def reset() -> None:
    """Forget the tables; the next lookup calls the hooks again."""
    global _backbones, _rewards
    _backbones = None
    _rewards = None


def _call_hook(impl: Any, kind: str, found: dict[str, Any], make: Callable[..., Any]) -> dict[str, Any]:
    """One plugin's hook, called with its own ``register``: what it registered, by name."""
    plugin, info = impl.plugin_name, plugin_info(impl.plugin_name)
    mine: dict[str, Any] = {}
    clash: list[DuplicateNameError] = []

    def register(name: str, factory: Callable[..., Any], *args: Any, **kw: Any) -> None:
        if name in found or name in mine:
            first = found.get(name) or mine[name]
            clash.append(
                DuplicateNameError(
                    f"{kind} '{name}' is registered by both plugin '{first.plugin}' ({first.distribution}) and "
                    f"plugin '{plugin}' ({info.distribution}); uninstall one or set SUDER_LOAD_PLUGINS."
                )
            )
            raise clash[-1]
        mine[name] = make(name, factory, *args, plugin=plugin, distribution=info.distribution, **kw)

    try:
        impl.function(register)
    except Exception:
        if clash:  # a name clash is the user's to resolve, not a broken plugin to skip
            raise clash[0] from None
        raise
    return mine


def _collect(hook_name: str, make: Callable[..., Any]) -> dict[str, Any]:
    """Every plugin's ``hook_name``; a plugin whose hook raises is skipped (nothing it registered is kept), named
    in a warning and remembered in ``plugins.failures()``."""
    kind = hook_name[len("register_") : -1]
    found: dict[str, Any] = {}
    for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls():
        try:
            found.update(_call_hook(impl, kind, found, make))
        except DuplicateNameError:
            raise
        except Exception as exc:
            record_failure(impl.plugin_name, f"failed in its {hook_name} hook", f"{type(exc).__name__}: {exc}")
    return found


def _backbone_spec(name, factory, summary="", *, plugin, distribution, shapes_recipe=None) -> BackboneSpec:
    return BackboneSpec(name, factory, summary, plugin, distribution, shapes_recipe)


def _reward_spec(
    name, factory, directions=("gen", "und"), summary="", *, plugin, distribution, needs_reference=False
) -> RewardSpec:
    if not (isinstance(needs_reference, bool) or callable(needs_reference)):
        raise TypeError(f"needs_reference must be a bool or a callable of the options, got {needs_reference!r}")
    return RewardSpec(name, factory, tuple(directions), summary, plugin, distribution, needs_reference)


def backbones() -> dict[str, BackboneSpec]:
    """All registered backbones, by name."""
    global _backbones
    if _backbones is None or _backbones[0] != generation():
        table = _collect("register_backbones", _backbone_spec)  # loads the plugins first, which may bump it
        _backbones = (generation(), table)
    return _backbones[1]


def rewards() -> dict[str, RewardSpec]:
    """All registered rewards, by name."""
    global _rewards
    if _rewards is None or _rewards[0] != generation():
        table = _collect("register_rewards", _reward_spec)
        _rewards = (generation(), table)
    return _rewards[1]


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

    factory = get_backbone_spec(name).factory
    host = _unreachable_hub() if _may_download(kwargs.get("model")) else None
    if host is None:
        model = factory(**kwargs)
    else:
        try:
            with _hub_offline():
                model = factory(**kwargs)
        except BackboneError as exc:
            raise BackboneError(f"{str(exc).rstrip('.')} (the Hugging Face Hub at {host} cannot be reached, so "
                                "only the local cache was searched).") from exc
    check_backbone(model)
    return model


# ------------------------------------------------------------------ a missing checkpoint with no network
# With the Hub unreachable and HF_HUB_OFFLINE unset, huggingface_hub retries each file with backoff (about three
# minutes before a factory sees the error); one short connection attempt first, and the factory then runs in
# offline mode (the Hugging Face cache only), so a missing checkpoint is its one-line error within seconds.
HUB_CONNECT_TIMEOUT = 3.0  # seconds


def _may_download(model: Any) -> bool:
    """Whether a factory may ask the Hub: ``model`` is an ``owner/name`` id (or None: the backbone's default),
    not a path, and HF_HUB_OFFLINE is unset."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if model is None:
        return True
    text = str(model)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.exists(text)


@functools.lru_cache(maxsize=1)
def _unreachable_hub() -> str | None:
    """The Hub's host (``HF_ENDPOINT``) when one TCP connection to it, or to the proxy for it, fails within
    ``HUB_CONNECT_TIMEOUT``; None when it answers. Asked once per process."""
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    target = url
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        target = urlsplit(proxy if "//" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError:
        return url.netloc
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub (and transformers through it) in offline mode meanwhile. huggingface_hub reads
    HF_HUB_OFFLINE once, at import, and has no setter, so its ``constants.HF_HUB_OFFLINE`` is set here (what
    ``constants.is_offline_mode()`` returns); the environment variable too, for code that reads it."""
    from huggingface_hub import constants

    before, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env
