"""Distillation-based training of multi-exit networks (Phuong & Lampert, ICCV 2019).

``loss: exitwise`` trains every exit on the labels (Eq. 7, the baseline); ``loss: distill``
adds the distillation of early exits toward their teachers (Eqs. 1, 4, 5) with the adaptive
temperature annealing of §3.4 (or a constant temperature); unlabelled samples (label -100, the
data layer's ``unlabelled: true`` pool) give the semi-supervised objective of Eq. 6.

Evaluation reports the deployed prediction, the anytime mean of all exits' probabilities
(``accuracy``), the accuracy of every exit and of every anytime ensemble with the cumulative
MACs of reaching it, and the curves a plotter turns into the paper's accuracy-vs-FLOPs figures.
Budget mode and confidence early exit need a validation split to choose on:
:meth:`MultiExitTask.evaluate_modes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdedge.models.multiexit import num_exits
from kdedge.runtime import exits as modes
from kdedge.train.distributed import mean_over_ranks, unwrap
from kdedge.train.evaluate import stage_logits
from kdedge.train.fields import check_ranges, number
from kdedge.train.losses.multiexit import (
    TEACHER_CHOICES,
    anneal_temperature,
    exitwise_loss,
    multiexit_loss,
    teacher_confidence,
    teacher_sets,
)
from kdedge.train.task import GROWTH, MAX_TEMPERATURE, TEMPERATURE, Task, TemperatureState

LOSSES = ("exitwise", "distill")


@dataclass
class MultiExitConfig:
    """The ``loss:`` section of a multi-exit recipe.

    Args:
        loss: ``distill`` (Eq. 1; Eq. 6 with unlabelled data) or ``exitwise`` (Eq. 7).
        C: weight of distillation; the loss is 2·[(1-C)·L_cls + C·L_dist] (0.5: the paper's Eq. 1).
        T: the (initial) temperature.
        anneal: grow T by ``tau_factor`` after every batch whose teacher confidence at T exceeds
            ``mu`` (§3.4); false keeps T constant.
        mu: confidence bound μ (paper: 0.5 on CIFAR-100, 0.1 on ImageNet).
        tau_factor: τ*, the multiplier (paper: 1.05).
        teachers: ``last`` (every exit learns from the last), ``later`` (from all later exits) or
            explicit 0-based lists, one per exit (``[[2], [2], []]``).
    """

    loss: str = "distill"
    C: float = number(0.5, ge=0, le=1)
    T: float = number(1.0, gt=0, le=MAX_TEMPERATURE, what=TEMPERATURE)
    anneal: bool = True
    mu: float = number(0.5, gt=0, lt=1, what="a confidence bound in (0, 1)")
    tau_factor: float = number(1.05, gt=1, le=10, what=GROWTH)
    teachers: str | list[list[int]] = "last"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check_ranges(self, "loss")
        if isinstance(self.teachers, str) and self.teachers not in TEACHER_CHOICES:
            raise ValueError(f"loss.teachers must be 'last', 'later' or a list of per-exit lists, "
                             f"got {self.teachers!r}")


class MultiExitTask(TemperatureState, Task):
    """Exit-wise or distillation-based training of an ``msdnet`` / ``multiexit`` model."""

    name = "multiexit"
    Config: ClassVar[type] = MultiExitConfig
    families: ClassVar[tuple[str, ...]] = ("msdnet", "multiexit")
    default_model: ClassVar[dict] = {"name": "msdnet", "args": {"config": "small"}}

    def __init__(self, cfg: MultiExitConfig, *, num_classes: int, epochs: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.temperature = float(cfg.T)
        self.teachers: list[tuple[int, ...]] | None = None
        self._cost_cache: dict[tuple[int, tuple[int, ...]], list[int]] = {}

    # -- model checks ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """The model must be multi-exit; the teacher set must name existing exits."""
        m = num_exits(unwrap(model))
        self.teachers = teacher_sets(self.cfg.teachers, m)

    def _teachers_for(self, n: int) -> list[tuple[int, ...]]:
        if self.teachers is None:
            self.teachers = teacher_sets(self.cfg.teachers, n)
        if len(self.teachers) != n:
            raise ValueError(f"the model returned {n} exits but the teacher sets were built for {len(self.teachers)}")
        return self.teachers

    # -- training -------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, epoch: float) -> dict[str, Tensor]:
        out = model(x)
        if isinstance(out, Tensor) and out.dim() == 3:
            logits = list(out.unbind(0))
        elif isinstance(out, (list, tuple)) and out and all(isinstance(t, Tensor) for t in out):
            logits = list(out)
        else:
            raise ValueError("the multiexit method needs a model whose forward returns the list of exit logits "
                             "(model.name msdnet or multiexit)")
        if self.cfg.loss == "exitwise":
            loss = exitwise_loss(logits, y)
            return {"loss": loss, "ce": loss.detach()}
        teachers = self._teachers_for(len(logits))
        T = self.temperature
        loss, cls, dist_term = multiexit_loss(logits, y, teachers, T, self.cfg.C)
        result = {"loss": loss, "ce": cls.detach(), "dist": dist_term.detach(),
                  "temperature": torch.tensor(T)}
        conf = teacher_confidence(logits, teachers, T)
        if conf is not None:
            conf = mean_over_ranks(conf)
            result["teacher_conf"] = conf
            if self.cfg.anneal:
                self.temperature = anneal_temperature(T, float(conf), self.cfg.mu, self.cfg.tau_factor)
        return result

    def log_values(self) -> dict[str, float]:
        return {"temperature": self.temperature} if self.cfg.loss == "distill" else {}

    # -- evaluation -----------------------------------------------------------------------------
    def _cumulative_macs(self, model: nn.Module, stages: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[int]:
        from kdedge.models.flops import stage_costs

        key = (id(model), input_shape)
        if key not in self._cost_cache:
            costs = stage_costs(stages, input_shape)  # type: ignore[arg-type]
            self._cost_cache[key] = [int(v) for v in np.cumsum([c.macs for c in costs])]
        return self._cost_cache[key]

    def evaluate(self, model: nn.Module, loader: Any, device: Any) -> dict[str, Any]:
        """Accuracy of every exit and every anytime ensemble on ``loader``, with cumulative MACs.

        ``accuracy`` is the deployed default prediction: the anytime mean of the probabilities
        of all exits (combine rule ``mean_probs``). Nothing here is chosen on this split.
        """
        probs, labels, macs = exit_probabilities(self, model, loader, device)
        return summarize(probs, labels, macs)

    def evaluate_modes(self, model: nn.Module, val_loader: Any, test_loader: Any, device: Any,
                       target_costs: Sequence[float] | None = None) -> dict[str, Any]:
        """Budget mode and confidence early exit, chosen on ``val_loader``, scored on ``test_loader``.

        Returns:
            ``test`` (as :meth:`evaluate`), ``budget`` (per budget "exits 0..k affordable": the
            exit picked on validation accuracy, its test accuracy and MACs), ``early_exit``
            (MSDNet's threshold curve: thresholds fitted on validation for each geometric exit
            distribution, scored on test) and, for each of ``target_costs`` (MACs per sample),
            the validation-fitted thresholds and their test accuracy and mean MACs. ``curves``
            gains ``budget`` and ``early_exit`` ([macs, accuracy] points).
        """
        vp, vy, macs = exit_probabilities(self, model, val_loader, device)
        tp, ty, _ = exit_probabilities(self, model, test_loader, device)
        test = summarize(tp, ty, macs)
        val_acc = modes.accuracies(vp, vy)
        budget = modes.budget_curve(val_acc, test["per_exit"], macs)
        early = modes.threshold_curve(vp, vy, tp, ty, macs)
        targets = []
        for target in target_costs or ():
            th, fit = modes.fit_thresholds_for_cost(vp, vy, macs, float(target))
            res = modes.evaluate_thresholds(tp, ty, th, macs)
            targets.append({"target_macs": float(target), "thresholds": th, "val_accuracy": fit["accuracy"],
                            "val_macs": fit["mean_cost"], "accuracy": res["accuracy"], "macs": res["mean_cost"],
                            "exit_fractions": res["exit_fractions"]})
        test["curves"]["budget"] = [[b["cost"], b["accuracy"]] for b in budget]
        test["curves"]["early_exit"] = [[e["mean_cost"], e["accuracy"]] for e in early]
        return {"test": test, "val_per_exit": val_acc, "budget": budget, "early_exit": early, "targets": targets}

    def evaluate_final(self, model: nn.Module, val_loader: Any, test_loader: Any, device: Any) -> dict[str, Any]:
        """Test metrics plus budget mode and early-exit curves fitted on validation."""
        found = self.evaluate_modes(model, val_loader, test_loader, device)
        return {**found["test"], "modes": {k: found[k] for k in ("val_per_exit", "budget", "early_exit")}}


def exit_probabilities(task: MultiExitTask, model: nn.Module, loader: Any,
                       device: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Run the model's stages over a loader (labelled samples only).

    Returns:
        (probabilities [E, N, K] float32, labels [N], cumulative MACs of reaching each exit).

    Raises:
        ValueError: the loader holds no labelled sample.
    """
    inner = unwrap(model)
    found = stage_logits(inner, loader, device)
    macs = task._cumulative_macs(inner, inner.stages(), found.input_shape)  # type: ignore[operator]
    probs = modes.softmax(np.stack([z.numpy() for z in found.logits])).astype(np.float32)  # halve the memory
    return probs, found.labels.numpy(), macs


def summarize(probs: np.ndarray, labels: np.ndarray, macs: Sequence[int]) -> dict[str, Any]:
    """The JSON-able evaluation record of per-exit probabilities (see :meth:`MultiExitTask.evaluate`)."""
    any_probs = modes.anytime_probabilities(probs)
    per_exit = modes.accuracies(probs, labels)
    anytime = modes.accuracies(any_probs, labels)
    out: dict[str, Any] = {
        "accuracy": anytime[-1],
        "combine": "mean_probs",
        "per_exit": per_exit,
        "anytime": anytime,
        "macs": [int(m) for m in macs],
        "curves": {"anytime": [[int(m), a] for m, a in zip(macs, anytime)],
                   "per_exit": [[int(m), a] for m, a in zip(macs, per_exit)]},
        "stages": [{"stage": k, "members": k + 1, "accuracy_mean_probs": anytime[k], "accuracy_last": per_exit[k],
                    "macs": int(macs[k])} for k in range(len(per_exit))],
        "n": int(labels.shape[0]),
    }
    if probs.shape[-1] > 5:  # the paper reports top-5 on CIFAR-100 and ImageNet
        out["per_exit_top5"] = modes.topk_accuracies(probs, labels, 5)
        out["anytime_top5"] = modes.topk_accuracies(any_probs, labels, 5)
    return out
