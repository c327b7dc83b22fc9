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
suggestion. YAML is read with ``yaml.safe_load`` only: no tags, no code execution.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"                 # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # cosine | step | constant
    milestones: list[float] = field(default_factory=list)  # epochs (fractions allowed: lr is set per step), for schedule=step
    gamma: float = 0.1
    warmup_epochs: int = 0
    grad_clip: float | None = None    # max global grad norm; None = off


@dataclass
class TrainConfig:
    epochs: int = 10
    amp: str = "auto"                 # auto (bf16/fp16 autocast on CUDA only) | on | off
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    eval_every: int = 1               # epochs between validations
    checkpoint_every: int = 1         # epochs between checkpoints
    deterministic: bool = True        # deterministic algorithms where torch has them
    threads: int | None = None        # torch CPU threads; None = torch's default


@dataclass
class RunConfig:
    method: str = "baseline"
    seed: int = 0
    data: Any = None                  # DataConfig (imported lazily: it needs torch)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: Any = None                  # the method's Task.Config

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
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
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
        raise ConfigError(f"{where}: expected a mapping of options, got {values!r}")
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
        raise ConfigError(f"{where}: {e}") from None


def parse_value(text: str) -> Any:
    """An override's value: a YAML scalar or flow list/mapping (``0.1``, ``[1, 2]``, ``null``)."""
    try:
        return yaml.safe_load(text)
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
    set_key(raw, key, parse_value(value))


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
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


def validate(cfg: RunConfig) -> None:
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1, got {cfg.train.epochs}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
    if cfg.optim.name not in ("sgd", "adamw"):
        raise ConfigError(f"optim.name must be sgd or adamw, got {cfg.optim.name!r}")
    if cfg.optim.schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"optim.schedule must be cosine, step or constant; got {cfg.optim.schedule!r}")
    if cfg.optim.schedule == "step" and not cfg.optim.milestones:
        raise ConfigError("optim.schedule=step needs optim.milestones (epochs), e.g. [150, 225]")
    if cfg.optim.warmup_epochs < 0 or cfg.optim.warmup_epochs >= cfg.train.epochs and cfg.optim.warmup_epochs > 0:
        raise ConfigError(f"optim.warmup_epochs must be in [0, train.epochs), got {cfg.optim.warmup_epochs}")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be positive or null, got {cfg.optim.grad_clip}")
    if cfg.train.amp not in ("auto", "on", "off"):
        raise ConfigError(f"train.amp must be auto, on or off; got {cfg.train.amp!r}")
    if cfg.train.eval_every < 1 or cfg.train.checkpoint_every < 1:
        raise ConfigError("train.eval_every and train.checkpoint_every must be at least 1")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be at least 1, got {cfg.data.batch_size}")


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
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
