"""Registries: plain dicts of ``name -> "module:attribute"``, resolved lazily.

Every name a user chooses (a model, a method, a dataset, a target, a meter, a command) lives in
such a dict beside the code that owns it; :func:`resolve` imports the module only when the name
is asked for, so an import error in one entry never hides the others, and an unknown name fails
with a close-match suggestion (:func:`suggest`). Standard library only.

Example:
    >>> from kdedge.registry import resolve
    >>> resolve({"dumps": "json:dumps"}, "dumps", what="codec")([1])
    '[1]'
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterable


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message suggests the closest names."""


def suggest(name: str, known: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` for an unknown ``name``, else the sorted list of known names."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "known: " + ", ".join(known)


def unknown(name: str, known: Iterable[str], *, what: str,
            error: Callable[[str], Exception] = UnknownNameError) -> Exception:
    """The error for an unknown ``name`` (``"unknown model 'x'; did you mean ...?"``), to raise."""
    return error(f"unknown {what} {name!r}; {suggest(name, known)}")


def load(where: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module, sep, attr = where.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"registry entry {where!r} is not 'module:attribute'")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(registry: dict[str, str], name: str, *, what: str,
            error: Callable[[str], Exception] = UnknownNameError) -> Any:
    """The object that ``registry[name]`` names, imported now.

    Raises:
        ``error`` (default :class:`UnknownNameError`): ``name`` is not in the registry; the
        message suggests the closest known names.
    """
    if name not in registry:
        raise unknown(name, registry, what=what, error=error)
    return load(registry[name])


__all__ = ["UnknownNameError", "load", "resolve", "suggest", "unknown"]
