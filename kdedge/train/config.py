"""The run configuration: a YAML recipe plus command-line overrides, validated once.

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

Every numeric field declares its allowed range (:func:`kdedge.train.fields.number`), checked
wherever a section is created; cross-field rules (warm-up shorter than the run, ...) are in
:func:`validate`. The configuration describes a training run: its ``data`` and ``loss``
sections are defined by the data layer and the methods, so it lives in the training layer
(``kdedge.config`` re-exports it under its old name). Importing this module imports no torch;
:func:`resolve` imports the data layer and the method's task module when it runs.

Example:
    >>> cfg = load_config("configs/hne_mnist_demo.yaml", ["train.epochs=2"])
    >>> cfg.train.epochs
    2
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdedge.registry import suggest
from kdedge.train.fields import ConfigError, build_dataclass, check_ranges, coerce, number, short_repr
from kdedge.yaml_io import YAMLRefused, dumps_yaml, loads_yaml, read_text_file, yaml_error_text

MAX_SEED = 2**32 - 1    # numpy's legacy RandomState limit; also keeps seed * 100_003 inside torch's 64 bits


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
    epochs: int = number(10, ge=1, le=1_000_000)
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
    data: Any = None                  # DataConfig (imported when resolving: the data layer needs torch)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: Any = None                  # the method's Task.Config

    def __post_init__(self) -> None:
        check_ranges(self, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = ("method", "seed", "data", "model", "optim", "train", "loss")


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
        raise ConfigError(f"value {short_repr(text)} is not allowed{yaml_error_text(e)}") from None
    except yaml.YAMLError:
        return text


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``optim.lr``) in a nested dict, creating mappings on the way.

    Raises:
        ConfigError: the first part is not a section, or a part on the way is not a mapping.
    """
    parts = key.strip().split(".")
    if parts[0] not in _SECTIONS:
        raise ConfigError(f"unknown key {parts[0]!r} in {key!r}; {suggest(parts[0], _SECTIONS)}")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{key!r}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply a ``a.b.c=value`` override (value parsed as a YAML scalar or flow list).

    Example:
        >>> raw = {}
        >>> apply_override(raw, "optim.lr=0.05")
        >>> raw
        {'optim': {'lr': 0.05}}
    """
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
    """Validate a raw nested dict into a RunConfig (method defaults for the loss section).

    Raises:
        ConfigError: an unknown section or method, or any section that its checks refuse
            (a ``data`` section raises the data layer's ``DataError``).
    """
    from kdedge.train.data import DataConfig
    from kdedge.train.task import get_task_class

    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"unknown key {key!r}; {suggest(str(key), _SECTIONS)}")
    method = raw.get("method", "baseline")
    if not isinstance(method, str):
        raise ConfigError(f"method: expected a name, got {method!r}")
    try:
        task_cls = get_task_class(method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seed = coerce(raw.get("seed", 0), int, "seed")
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
    """Cross-field rules and choices; each field's range was checked when its section was built.

    Raises:
        ConfigError: the first rule ``cfg`` breaks, with the setting to change.
    """
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
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {short_repr(cfg.train.device)}")
    if not isinstance(cfg.model.name, str) or not cfg.model.name:
        raise ConfigError(f"model.name must be a model registry name, got {short_repr(cfg.model.name)}")
    bad_keys = [k for k in cfg.model.args if not isinstance(k, str) or not k.isidentifier()]
    if bad_keys:
        raise ConfigError(f"model.args keys must be option names, got {short_repr(bad_keys[0])}")
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

    Args:
        path: a YAML recipe (None = only ``base`` and the overrides).
        overrides: ``key.path=value`` strings, applied in order after the recipe.
        base: raw sections the recipe's own sections replace.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ConfigError: the recipe, an override or a section is refused (the message says why).

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


__all__ = [
    "MAX_SEED",
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_override",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "parse_value",
    "read_yaml",
    "resolve",
    "set_key",
    "validate",
]
