"""Typed config fields: declared numeric ranges, and YAML values checked into dataclasses.

Every section of a recipe is a dataclass (the run's own sections in :mod:`kdedge.train.config`,
``data:`` in :mod:`kdedge.train.data.config`, each method's ``loss:`` in its task module). A
numeric field declares the values it accepts as field metadata (:func:`number`), and
:func:`check_ranges`, called from the dataclass's ``__post_init__``, refuses anything else,
finiteness included, so ``optim.lr: .nan`` fails with ``optim.lr must be a finite number > 0,
got nan`` instead of training into NaN. :func:`build_dataclass` turns a mapping read from YAML
into such a dataclass: unknown keys fail with a close-match suggestion, values are checked
against the field types (no eval, no imports).

This module knows nothing of any section in particular, which is what lets the sections' own
modules (data, tasks, the run config) import it without importing each other. Standard library
only.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Opts:
    ...     T: float = number(3.0, gt=0)
    ...     def __post_init__(self) -> None:
    ...         check_ranges(self, "loss")
    >>> build_dataclass(Opts, {"T": 2}, "loss")
    Opts(T=2.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

from kdedge.registry import suggest


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


RANGE = "kdedge.range"  # the field-metadata key of a Range


@dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts: finite, within the given bounds.

    Args:
        ge, gt, le, lt: inclusive / exclusive lower and upper bounds (None = unbounded).
        what: the allowed values in words, for the message (default: derived from the bounds).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    what: str | None = None

    def admits(self, v: float) -> bool:
        return (math.isfinite(v) and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self, integer: bool) -> str:
        """The allowed values in words: ``a finite number > 0``, ``an integer in [1, 1024]``."""
        if self.what:
            return self.what
        low = ("[", ">=", self.ge) if self.ge is not None else ("(", ">", self.gt) if self.gt is not None else None
        high = ("]", "<=", self.le) if self.le is not None else (")", "<", self.lt) if self.lt is not None else None
        if low and high:
            return f"{'an integer' if integer else 'a number'} in {low[0]}{_num(low[2])}, {_num(high[2])}{high[0]}"
        kind = "an integer" if integer else "a finite number"
        bound = low or high
        return f"{kind} {bound[1]} {_num(bound[2])}" if bound else kind


def _num(v: float | None) -> str:
    if v is None or isinstance(v, int):
        return str(v)
    if abs(v) >= 1e6:
        return f"{v:g}"  # 1e+30, not 1000000000000000019884624838656
    return str(int(v)) if v.is_integer() else str(v)


def number(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, what: str | None = None) -> Any:
    """A dataclass field holding a number (or a list of numbers) in a declared range.

    Args:
        default, default_factory: as for :func:`dataclasses.field`.
        ge, gt, le, lt: the bounds of :class:`Range`.
        what: the allowed values in words, for the message.

    Returns:
        A :func:`dataclasses.field` carrying the :class:`Range` under :data:`RANGE`.

    Example:
        >>> gamma: float = number(0.1, gt=0, le=1)  # "optim.gamma must be a number in (0, 1], got nan"
    """
    meta = {RANGE: Range(ge=ge, gt=gt, le=le, lt=lt, what=what)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def _ranged_fields(cls: type) -> tuple[tuple[str, Range, bool, bool], ...]:
    """(name, range, holds integers, may be None) of every ranged field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if RANGE in f.metadata:
            tp = hints[f.name]
            args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            inner = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args if a is not type(None)]
            out.append((f.name, f.metadata[RANGE], inner == [int], type(None) in args))
    return tuple(out)


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 40 characters: a message quotes a bad value, not a whole file."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_ranges(obj: Any, section: str, error: type[ValueError] = ConfigError) -> None:
    """Raise ``error`` naming the first field of dataclass ``obj`` outside its declared range.

    Runs in ``__post_init__`` of every config dataclass, so a config built in Python is checked
    like one read from YAML. Lists (``optim.milestones``) are checked element by element.

    Args:
        obj: a dataclass instance whose numeric fields were declared with :func:`number`.
        section: prefixes the key in the message (``""`` for top-level keys such as ``seed``).
        error: the exception type to raise (``DataError`` for the data section).

    Raises:
        ``error``: ``"{section}.{name} must be {allowed values}, got {value}"``.
    """
    for name, rng, integer, optional in _ranged_fields(type(obj)):
        value = getattr(obj, name)
        if value is None and optional:
            continue
        key = f"{section}.{name}" if section else name
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if not _admits(rng, v, integer):
                where, null = (key, " (or null)" if optional else "") if i is None else (f"{key}[{i}]", "")
                raise error(f"{where} must be {rng.describe(integer)}{null}, got {short_repr(v)}")


def _admits(rng: Range, v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        return False
    try:
        return rng.admits(v)
    except OverflowError:  # an int beyond float range, compared with a float bound
        return False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and where lossless, convert) a YAML value to a dataclass field type.

    Args:
        value: what YAML gave (a scalar, list or mapping).
        tp: the field's type hint (``int``, ``float | None``, ``list[float]``, a dataclass, ...).
        where: the key, for the message (``optim.lr``).

    Returns:
        The value as ``tp`` (an integer-valued float for an ``int`` field becomes an int, an
        int for a ``float`` field a float, a mapping for a dataclass field that dataclass).

    Raises:
        ConfigError: the value does not have the field's type.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer literal with hundreds of digits
            raise ConfigError(f"{where} must be a finite number, got {short_repr(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)  # type: ignore[arg-type]
    return value


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion.

    Args:
        cls: the section's dataclass.
        values: a mapping of options (None = all defaults); an instance of a dataclass is
            returned as it is.
        where: the section's key, for messages (``data``, ``loss``).

    Returns:
        An instance of ``cls``, checked by its own ``__post_init__``.

    Raises:
        ConfigError: not a mapping, an unknown key (``unknown key optim.lrr; did you mean
            'lr'?``), a value of the wrong type, or what the dataclass's check refuses.
    """
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {short_repr(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}.{key}; {suggest(str(key), names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        text = str(e)  # the dataclass's own check usually names the key already ("loss.T must ...")
        raise ConfigError(text if text.startswith(f"{where}.") else f"{where}: {text}") from None


__all__ = ["RANGE", "ConfigError", "Range", "build_dataclass", "check_ranges", "coerce", "number", "short_repr"]
