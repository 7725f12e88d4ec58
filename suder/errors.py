"""Typed, user-facing errors. Each message is one sentence a user can act on; the CLI prints it without a
traceback (``suder.cli``), library callers can catch the type."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SuderError(Exception):
    """Base class of every error suder raises on purpose."""


class UnknownNameError(SuderError, KeyError):
    """A backbone, reward, algorithm or strategy name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(SuderError):
    """Two plugins (or two distributions) claim the same name."""


class PluginError(SuderError):
    """A plugin is malformed (an unknown hook name, no hooks) and cannot be registered."""


class BackboneError(SuderError):
    """A backbone could not be built or loaded (missing weights, bad folder, missing dependency)."""


class ConfigError(SuderError, ValueError):
    """A configuration key or value is wrong."""


class DataError(SuderError, ValueError):
    """Training or evaluation data is missing, empty or unreadable."""


class TrainingError(SuderError, RuntimeError):
    """A training invariant failed (for example the first GRPO importance ratio is not 1)."""


class HubError(SuderError):
    """A push to the Hugging Face Hub cannot start (offline, no token, a bad repository id) or failed."""


def closest(name: str, options: Iterable[str]) -> str | None:
    """The closest option to ``name``, for 'did you mean' hints."""
    hits = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return hits[0] if hits else None


def unknown(kind: str, name: str, options: Iterable[str]) -> UnknownNameError:
    """``Unknown backbone 'showo2'. Available: janus-pro, show-o, toy.`` (plus a suggestion when close)."""
    opts = sorted(options)
    hint = closest(name, opts)
    suggestion = f" Did you mean '{hint}'?" if hint and hint != name else ""
    return UnknownNameError(f"Unknown {kind} '{name}'. Available: {', '.join(opts) if opts else '(none)'}.{suggestion}")
