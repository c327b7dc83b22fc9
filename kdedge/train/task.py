"""The task interface: one task per training method, driven by ``fit()``.

A task owns the method's loss and its per-batch state (e.g. an annealed temperature); the fit
loop owns the optimiser, schedule, data, devices, DDP, checkpoints and logging. A training step
returns named losses: ``"loss"`` (the scalar to back-propagate) plus detached scalars to log.

Methods are chosen by name from ``METHODS``, a plain dict of ``"module:Class"`` strings whose
modules are imported lazily (:func:`kdedge.registry.resolve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from kdedge.registry import resolve
from kdedge.train.distributed import mean_over_ranks, unwrap  # re-exported: tasks used to import them from here
from kdedge.train.labels import IGNORE_INDEX

# Bounds shared by the methods' loss options. Far beyond any paper's setting (T of 1 to 4,
# weights up to 4, growth 1.05 per batch), they stop a typo such as T: 1e300 from becoming an
# infinite loss at step 1 whose message would blame the learning rate.
MAX_TEMPERATURE = 1000.0
MAX_WEIGHT = 1000.0
TEMPERATURE = "a positive temperature, at most 1000"
GROWTH = "> 1 and at most 10 (the temperature only grows)"

METHODS: dict[str, str] = {
    "baseline": "kdedge.train.tasks.baseline:BaselineTask",
    "hne": "kdedge.train.tasks.hne:HNETask",
    "ahbf": "kdedge.train.tasks.ahbf:AHBFTask",
    "multiexit": "kdedge.train.tasks.multiexit:MultiExitTask",
}


@dataclass
class NoOptions:
    """A method without loss options."""


class Task:
    """Base class of a training method.

    Subclasses set ``name``, ``Config`` (a dataclass: the ``loss:`` section of a recipe) and
    ``families`` (model registry names or family tags the method can train; empty = any), and
    implement ``training_step``.

    Args:
        cfg: an instance of ``Config``, already validated.
        num_classes: number of classes of the dataset.
        epochs: total number of training epochs (for ramp-ups).
        steps_per_epoch: optimiser steps per epoch on this process.
    """

    name: ClassVar[str] = "task"
    Config: ClassVar[type] = NoOptions
    # The model used when a user names the method but no model (``kdedge train --method X``);
    # ``{"name": registry name, "args": {...}}``; it should train on small inputs (28x28, 8x8).
    default_model: ClassVar[dict] = {"name": "small_cnn", "args": {}}

    def __init__(self, cfg: Any, *, num_classes: int, epochs: int, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` with a clear message if this method cannot train ``model``."""

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, epoch: float) -> dict[str, Tensor]:
        """One batch. ``y == IGNORE_INDEX`` marks unlabelled samples; ``epoch`` is fractional.

        Returns ``{"loss": scalar with grad, ...}``; other entries are logged (detached scalars).
        ``model`` may be wrapped in DDP: call ``model(x)``, reach attributes via ``unwrap(model)``.
        """
        raise NotImplementedError

    def log_values(self) -> dict[str, float]:
        """Per-epoch values to log besides the losses (e.g. the current temperature)."""
        return {}

    def evaluate(self, model: nn.Module, loader: Any, device: Any) -> dict[str, Any]:
        """Metrics on a loader; must contain ``"accuracy"`` (of the deployed prediction)."""
        from kdedge.train.evaluate import evaluate_model

        return evaluate_model(model, loader, device)

    def evaluate_final(self, model: nn.Module, val_loader: Any, test_loader: Any, device: Any) -> dict[str, Any]:
        """Test-split metrics for the run record and ``kdedge eval``. Methods whose prediction
        modes are fitted on validation data (multi-exit budget mode, exit thresholds) override
        this to fit on ``val_loader`` and score on ``test_loader``."""
        del val_loader
        return self.evaluate(model, test_loader, device)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state restored on ``--resume`` (e.g. the annealed temperature)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class TemperatureState:
    """Mixin for tasks whose distillation temperature is annealed during training: the
    temperature is part of the task's state, saved in checkpoints and restored on resume."""

    temperature: float

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "temperature" in state:
            t = float(state["temperature"])
            if not (t > 0 and math.isfinite(t)):
                raise ValueError(f"checkpoint holds an invalid temperature {state['temperature']!r}")
            self.temperature = t


def get_task_class(name: str) -> type[Task]:
    """The task class of a method name in ``METHODS``, imported now.

    Args:
        name: a method name (``hne``, ``ahbf``, ...).

    Returns:
        The :class:`Task` subclass.

    Raises:
        kdedge.registry.UnknownNameError: (a ValueError) ``name`` is not a method; the message
            suggests the closest names (``unknown method 'hnee'; did you mean 'hne'?``).

    Example:
        >>> get_task_class("hne").Config  # doctest: +SKIP
        <class 'kdedge.train.tasks.hne.HNEConfig'>
    """
    return resolve(METHODS, name, what="method")


__all__ = ["IGNORE_INDEX", "METHODS", "NoOptions", "Task", "TemperatureState", "get_task_class", "mean_over_ranks",
           "unwrap"]
