"""Typed run configuration: a YAML recipe plus command-line overrides, validated once.

A recipe has these top-level sections (all optional but ``method``'s defaults apply)::

    method: hne                       # a name in kdedge.train.task.METHODS
    seed: 0
    data:  {...}                      # kdedge.train.data.DataConfig
    model: {name: hne, args: {...}}   # create_model(name, **args)
    optim: {...}                      # OptimConfig
    train: {...}                      # TrainConfig
    loss:  {...}                      # the method's Task.Config

Overrides are ``key.path=value`` strings whose values are parsed as YAML scalars/lists
(``--set optim.lr=0.05 --set model.args.B=3``). Unknown keys fail with a close-match
suggestion. YAML is read strictly (:mod:`kdedge.yaml_io`): safe constructors only, no tags,
anchors, aliases or duplicate keys, bounded size and depth.

Every numeric field declares its allowed range as field metadata (:func:`number`), and
:func:`check_ranges` checks it, finiteness included, wherever a config dataclass is created, so
``optim.lr: .nan`` is refused with ``optim.lr must be a finite number > 0, got nan`` instead
of training into NaN. Cross-field rules (warm-up shorter than the run, ...) are in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdedge.yaml_io import YAMLRefused, dumps_yaml, loads_yaml, read_text_file, yaml_error_text


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


# --- declared ranges of numeric fields ----------------------------------------------------------

RANGE = "kdedge.range"  # the field-metadata key of a Range
MAX_SEED = 2**32 - 1    # numpy's legacy RandomState limit; also keeps seed * 100_003 inside torch's 64 bits


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

    Example:
        >>> gamma: float = number(0.1, gt=0, le=1)  # "optim.gamma must be a number in (0, 1], got nan"
    """
    meta = {RANGE: Range(ge=ge, gt=gt, le=le, lt=lt, what=what)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@functools.lru_cache(maxsize=None)
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


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_ranges(obj: Any, section: str, error: type[ValueError] = ConfigError) -> None:
    """Raise ``error`` naming the first field of dataclass ``obj`` outside its declared range.

    Runs in ``__post_init__`` of every config dataclass, so a config built in Python is checked
    like one read from YAML. Lists (``optim.milestones``) are checked element by element.
    ``section`` prefixes the key in the message (``""`` for top-level keys such as ``seed``).
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
                raise error(f"{where} must be {rng.describe(integer)}{null}, got {_show(v)}")


def _admits(rng: Range, v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        return False
    try:
        return rng.admits(v)
    except OverflowError:  # an int beyond float range, compared with a float bound
        return False


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"                 # sgd | adamw
    # Upper bounds keep values torch turns into float32 scalars inside float32 (beyond ~3.4e38 its
    # optimisers fail with an overflow error); a merely too-large lr stops at the first non-finite loss.
    lr: float = number(0.1, gt=0, le=1e30)
    momentum: float = number(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = number(5e-4, ge=0, le=1)
    schedule: str = "cosine"          # cosine | step | constant
    # epochs (fractions allowed: lr is set per step), for schedule=step
    milestones: list[float] = number(default_factory=list, ge=0)
    gamma: float = number(0.1, gt=0, le=1)  # the step schedule's decay factor
    warmup_epochs: int = number(0, ge=0)
    grad_clip: float | None = number(None, gt=0)  # max global grad norm; None = off

    def __post_init__(self) -> None:
        check_ranges(self, "optim")


@dataclass
class TrainConfig:
    epochs: int = number(10, ge=1)
    amp: str = "auto"                 # auto (bf16/fp16 autocast on CUDA only) | on | off
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    eval_every: int = number(1, ge=1)        # epochs between validations
    checkpoint_every: int = number(1, ge=1)  # epochs between checkpoints
    deterministic: bool = True        # deterministic algorithms where torch has them
    # torch CPU threads; None = torch's default. 1024 is more than any machine kdedge runs on has;
    # beyond it OpenMP would try to start the threads.
    threads: int | None = number(None, ge=1, le=1024)

    def __post_init__(self) -> None:
        check_ranges(self, "train")


@dataclass
class RunConfig:
    method: str = "baseline"
    seed: int = number(0, ge=0, le=MAX_SEED)
    data: Any = None                  # DataConfig (imported lazily: it needs torch)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: Any = None                  # the method's Task.Config

    def __post_init__(self) -> None:
        check_ranges(self, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = ("method", "seed", "data", "model", "optim", "train", "loss")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(sorted(known))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to a dataclass field type (no eval, no imports)."""
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
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer literal with hundreds of digits
            raise ConfigError(f"{where} must be a finite number, got {_show(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    return value


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}.{key}; {_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        text = str(e)  # the dataclass's own check usually names the key already ("loss.T must ...")
        raise ConfigError(text if text.startswith(f"{where}.") else f"{where}: {text}") from None


def parse_value(text: str) -> Any:
    """An override's value: a YAML scalar or flow list/mapping (``0.1``, ``[1, 2]``, ``null``).

    Text that is not YAML is taken as a string (``data.root=C:/data: old``); what the strict
    loader refuses (an alias, a tag, a duplicate key) is an error, not a string.

    Raises:
        ConfigError: the value holds YAML that kdedge refuses.
    """
    try:
        return loads_yaml(text)
    except YAMLRefused as e:
        raise ConfigError(f"value {_show(text)} is not allowed{yaml_error_text(e)}") from None
    except yaml.YAMLError:
        return text


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``optim.lr``) in a nested dict, creating mappings on the way."""
    parts = key.strip().split(".")
    if parts[0] not in _SECTIONS:
        raise ConfigError(f"unknown key {parts[0]!r} in {key!r}; {_suggest(parts[0], list(_SECTIONS))}")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{key!r}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply a ``a.b.c=value`` override (value parsed as a YAML scalar or flow list)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: expected key=value, e.g. optim.lr=0.05")
    try:
        parsed = parse_value(value)
    except ConfigError as e:
        raise ConfigError(f"--set {key.strip()}: {e}") from None
    set_key(raw, key, parsed)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe (or a run's config.yaml) as a raw dict of sections, read strictly.

    Raises:
        ConfigError: the file is missing, not a regular text file, larger than 1 MiB, not
            valid YAML, uses what kdedge refuses (aliases, tags, duplicate keys), or is not a
            mapping; the message names the file (and the line).
    """
    p = Path(path)
    what = f"config file {str(p)!r}"
    try:
        text = read_text_file(p, what)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        raw = loads_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML{yaml_error_text(e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections ({', '.join(_SECTIONS)})")
    return raw


def resolve(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw nested dict into a RunConfig (method defaults for the loss section)."""
    from kdedge.train.data import DataConfig
    from kdedge.train.task import get_task_class

    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"unknown key {key!r}; {_suggest(str(key), list(_SECTIONS))}")
    method = raw.get("method", "baseline")
    if not isinstance(method, str):
        raise ConfigError(f"method: expected a name, got {method!r}")
    try:
        task_cls = get_task_class(method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seed = _coerce(raw.get("seed", 0), int, "seed")
    cfg = RunConfig(
        method=method,
        seed=seed,
        data=build_dataclass(DataConfig, raw.get("data"), "data"),
        model=build_dataclass(ModelConfig, raw.get("model"), "model"),
        optim=build_dataclass(OptimConfig, raw.get("optim"), "optim"),
        train=build_dataclass(TrainConfig, raw.get("train"), "train"),
        loss=build_dataclass(task_cls.Config, raw.get("loss"), "loss"),
    )
    validate(cfg)
    return cfg


_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def validate(cfg: RunConfig) -> None:
    """Cross-field rules and choices; each field's range was checked when its section was built."""
    if cfg.optim.name not in ("sgd", "adamw"):
        raise ConfigError(f"optim.name must be sgd or adamw, got {cfg.optim.name!r}")
    if cfg.optim.schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"optim.schedule must be cosine, step or constant; got {cfg.optim.schedule!r}")
    if cfg.optim.schedule == "step" and not cfg.optim.milestones:
        raise ConfigError("optim.schedule=step needs optim.milestones (epochs), e.g. [150, 225]")
    if cfg.optim.warmup_epochs > 0 and cfg.optim.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"optim.warmup_epochs must be in [0, train.epochs={cfg.train.epochs}), "
                          f"got {cfg.optim.warmup_epochs}")
    if cfg.train.amp not in ("auto", "on", "off"):
        raise ConfigError(f"train.amp must be auto, on or off; got {cfg.train.amp!r}")
    if not _DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {_show(cfg.train.device)}")
    if not isinstance(cfg.model.name, str) or not cfg.model.name:
        raise ConfigError(f"model.name must be a model registry name, got {_show(cfg.model.name)}")
    bad_keys = [k for k in cfg.model.args if not isinstance(k, str) or not k.isidentifier()]
    if bad_keys:
        raise ConfigError(f"model.args keys must be option names, got {_show(bad_keys[0])}")
    _check_finite(cfg.model.args, "model.args")


def _check_finite(value: Any, where: str) -> None:
    """No NaN or infinity anywhere in free-form options (``model.args``): no model needs one,
    and one would surface only as a NaN loss (or a confusing error) much later."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Recipe file (optional) → apply overrides → validated RunConfig.

    Example:
        >>> cfg = load_config("configs/hne_mnist_demo.yaml", ["train.epochs=2"])
    """
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw.update(read_yaml(path))
    for item in overrides:
        apply_override(raw, item)
    return resolve(raw)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict()`` output (e.g. a run's saved config.yaml)."""
    return resolve(d)


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML that :func:`read_yaml` reads back (no aliases)."""
    return dumps_yaml(cfg.to_dict())
