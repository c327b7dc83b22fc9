"""The run configuration under its old import path (one release), re-exported from its home.

The configuration lives in :mod:`kdedge.train.config` (the run's sections, reading recipes and
overrides, validation) and its field machinery in :mod:`kdedge.train.fields` (declared ranges,
coercion of YAML values). New code imports from there; ``from kdedge.config import
load_config`` keeps working, with the same objects.

Example:
    >>> from kdedge.config import load_config
    >>> cfg = load_config("configs/hne_mnist_demo.yaml", ["train.epochs=2"])
"""

from __future__ import annotations

from kdedge.train.config import (
    MAX_SEED,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_override,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_value,
    read_yaml,
    resolve,
    set_key,
    validate,
)
from kdedge.train.fields import RANGE, ConfigError, Range, build_dataclass, check_ranges, number

__all__ = [
    "MAX_SEED",
    "RANGE",
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "Range",
    "RunConfig",
    "TrainConfig",
    "apply_override",
    "build_dataclass",
    "check_ranges",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "number",
    "parse_value",
    "read_yaml",
    "resolve",
    "set_key",
    "validate",
]
