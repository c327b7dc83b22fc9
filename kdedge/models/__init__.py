"""Architectures. ``create_model(name, **kwargs)`` is the one entry point.

The registry is a plain dict from name to ``"module:function"``, resolved with
:func:`kdedge.registry.resolve`: the module is imported only when that name is asked for, so an
import error in one family never hides the others, and an unknown name fails with a close-match
suggestion (:class:`UnknownNameError`, the registry's own class).

Builders take keyword arguments; ``num_classes`` and ``in_channels`` and ``input_size``
(an ``(H, W)`` pair) are passed by the training engine from the dataset.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

# one error type and one suggestion text for every registry (kdedge.registry); re-exported here
# because callers catch kdedge.models.UnknownNameError and format with kdedge.models.suggest
from kdedge.registry import UnknownNameError, resolve, suggest

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


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The builder function registered as ``name`` (its module is imported now).

    Raises:
        UnknownNameError: ``name`` is not in :data:`MODELS` (the message suggests close names).

    Example:
        >>> get_builder("resnet32").__name__
        'resnet32'
    """
    return resolve(MODELS, name, what="model")


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
