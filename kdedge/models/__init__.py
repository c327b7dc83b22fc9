"""Architectures. ``create_model(name, **kwargs)`` is the one entry point.

The registry is a plain dict from name to ``"module:function"``; the module is imported only
when that name is asked for, so an import error in one family never hides the others.
Builders take keyword arguments; ``num_classes`` and ``in_channels`` and ``input_size``
(an ``(H, W)`` pair) are passed by the training engine from the dataset.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable

from torch import nn

# name -> "module:builder". Families own their module; adding a model is one line here.
MODELS: dict[str, str] = {
    # backbones (kdedge/models/backbones.py)
    "resnet20": "kdedge.models.backbones:resnet20",
    "resnet32": "kdedge.models.backbones:resnet32",
    "resnet56": "kdedge.models.backbones:resnet56",
    "resnet110": "kdedge.models.backbones:resnet110",
    "mobilenetv2": "kdedge.models.backbones:mobilenetv2",
    "tv_resnet18": "kdedge.models.backbones:tv_resnet18",
    "tv_resnet34": "kdedge.models.backbones:tv_resnet34",
    "tv_resnet50": "kdedge.models.backbones:tv_resnet50",
    "tv_mobilenet_v2": "kdedge.models.backbones:tv_mobilenet_v2",
    "small_cnn": "kdedge.models.backbones:small_cnn",
    # hierarchical neural ensembles (kdedge/models/hne.py)
    "hne": "kdedge.models.hne:hne",
    # AHBF-OKD hierarchical branches (kdedge/models/ahbf.py)
    "ahbf": "kdedge.models.ahbf:ahbf",
    # multi-exit networks (kdedge/models/multiexit.py)
    "msdnet": "kdedge.models.multiexit:msdnet",
    "multiexit": "kdedge.models.multiexit:multiexit",
}


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message suggests the closest names."""


def suggest(name: str, known: list[str] | tuple[str, ...] | Any) -> str:
    """``"did you mean 'x'?"`` text for an unknown name, or the list of known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "known: " + ", ".join(known)


def get_builder(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise UnknownNameError(f"unknown model {name!r}; {suggest(name, MODELS)}")
    module_name, _, fn_name = MODELS[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, fn_name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registry name.

    Unknown keyword arguments fail with a close-match suggestion (builders declare theirs).

    Example:
        >>> m = create_model("resnet32", num_classes=100)
    """
    builder = get_builder(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                raise UnknownNameError(f"model {name!r} has no option {key!r}; {suggest(key, list(params))}")
    return builder(**kwargs)


__all__ = ["MODELS", "UnknownNameError", "create_model", "get_builder", "suggest"]
