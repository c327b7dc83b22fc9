"""AHBF-OKD training (Gong et al., AAAI 2023) and its online-distillation baselines.

``loss.variant`` picks the objective; the model (``model.name: ahbf``) must be built to match:

| variant   | objective                                     | model.args             |
|-----------|-----------------------------------------------|------------------------|
| ``ahbf``    | Eq. 14: CE on branches and TAs + ω·(λ1·TAKL + λ2·BTKL) | ``fusion: ahbf``, branches >= 2 |
| ``one``     | ONE: CE + gated-ensemble KD (Eq. 7)           | ``fusion: one``, branches >= 2  |
| ``cl``      | CL: each branch learns from the others' mean  | ``fusion: none``, branches >= 2 |
| ``dml``     | DML: each branch learns from each other one   | ``fusion: none``, branches >= 2 |
| ``vanilla`` | CE on the target network alone                | ``fusion: none``, branches: 1   |

``loss.objective`` picks AHBF's distillation terms: ``paper`` (Eq. 11, the default) or
``authors`` (their training code: a third KL family, each assistant teaching its own branch,
weighted by λ1, and all distillation scaled by 0.75). Every distillation term is scaled by the
ramp-up ω(i) of Eq. 13 (E = ``rampup_epochs``, default the run's epochs), so the baselines
share AHBF's schedule. For ONE/CL/DML set ``aux: 0`` to get their identical-branch setting.
Evaluation reports the target branch's accuracy (what ``deploy()`` exports) as ``accuracy``,
plus every branch's and every teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdedge.models.ahbf import AHBFNet, AHBFOutput, AHBFStudent
from kdedge.train.distributed import unwrap
from kdedge.train.evaluate import eval_mode, evaluate_model, labelled_batches
from kdedge.train.fields import check_ranges, number
from kdedge.train.losses.ahbf import ahbf_loss, cl_loss, dml_loss, labelled_ce, one_loss, rampup
from kdedge.train.task import MAX_TEMPERATURE, MAX_WEIGHT, TEMPERATURE, Task

VARIANTS = ("ahbf", "one", "cl", "dml", "vanilla")
OBJECTIVES = ("paper", "authors")
# The authors' latest training script weights every KL term by kd_weight (default 1.5) and a
# ramp-up it multiplies by 0.5: 0.75 · ω(i) overall.
AUTHORS_KD_SCALE = 0.75
FUSION_OF = {"ahbf": "ahbf", "one": "one", "cl": "none", "dml": "none", "vanilla": "none"}
_LAMBDAS = (4.0, 2.0)


@dataclass
class AHBFConfig:
    """The ``loss:`` section of an AHBF recipe.

    Args:
        variant: ``ahbf`` | ``one`` | ``cl`` | ``dml`` | ``vanilla`` (see the module table).
        lambda1: λ1, weight of L_TAKL (``ahbf`` only; the paper's best: 4).
        lambda2: λ2, weight of L_BTKL (``ahbf`` only; the paper's best: 2).
        tau: temperature τ of every distillation term (3 in the paper).
        rampup_epochs: E of the ramp-up ω(i) = exp(−5(1 − i/E)²); None = the run's epochs
            (the paper's best); 0 = no ramp-up.
        detach_teacher: no gradient through the teacher side of a KL term (see docs/ahbf.md;
            the authors' AHBF code does not detach: set false to reproduce it).
        kd_weight: weight of the distillation term of ``one``, ``cl`` and ``dml``.
        objective: ``paper`` (Eq. 11: λ1·TAKL + λ2·BTKL) or ``authors`` (``ahbf`` only): the
            objective of the authors' code, which adds λ1·TBKL = λ1·KL(ta(m) ‖ branch m) and
            scales the distillation by 0.75 (see docs/ahbf.md).
    """

    variant: str = "ahbf"
    lambda1: float = number(4.0, ge=0, le=MAX_WEIGHT)
    lambda2: float = number(2.0, ge=0, le=MAX_WEIGHT)
    tau: float = number(3.0, gt=0, le=MAX_TEMPERATURE, what=TEMPERATURE)
    # null = the run's epochs
    rampup_epochs: float | None = number(None, ge=0)
    detach_teacher: bool = True
    kd_weight: float = number(1.0, ge=0, le=MAX_WEIGHT)
    objective: str = "paper"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"loss.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"loss.objective must be paper or authors, got {self.objective!r}")
        check_ranges(self, "loss")
        if self.variant != "ahbf" and self.objective != "paper":
            raise ValueError(f"loss.objective picks AHBF's distillation terms; variant {self.variant!r} does not "
                             f"use them")
        # settings a variant would silently ignore are refused instead
        if self.variant != "ahbf" and (self.lambda1, self.lambda2) != _LAMBDAS:
            raise ValueError(f"loss.lambda1/lambda2 weight AHBF's assistant losses; variant {self.variant!r} "
                             f"does not use them (its distillation weight is loss.kd_weight)")
        if self.variant in ("ahbf", "vanilla") and self.kd_weight != 1.0:
            raise ValueError(f"loss.kd_weight weights the one/cl/dml distillation; variant {self.variant!r} "
                             f"does not use it" + (" (use lambda1/lambda2)" if self.variant == "ahbf" else ""))


class AHBFTask(Task):
    """AHBF-OKD and the ONE / CL / DML / vanilla baselines on an ``ahbf`` model."""

    name = "ahbf"
    Config: ClassVar[type] = AHBFConfig
    families: ClassVar[tuple[str, ...]] = ("ahbf",)
    # small enough for 8x8 digits and 28x28 MNIST on a CPU
    default_model: ClassVar[dict] = {"name": "ahbf", "args": {"backbone": "resnet8", "width": 8, "branches": 3, "aux": 1}}

    def __init__(self, cfg: AHBFConfig, *, num_classes: int, epochs: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.omega = 0.0
        self._cost_cache: dict[tuple[int, tuple[int, ...]], dict[str, int]] = {}

    @property
    def rampup_epochs(self) -> float:
        """E: the configured value, or the run's epochs."""
        return float(self.epochs if self.cfg.rampup_epochs is None else self.cfg.rampup_epochs)

    def check_model(self, model: nn.Module) -> None:
        """The model must be an ``ahbf`` model whose fusion and branch count fit the variant."""
        inner = unwrap(model)
        if not isinstance(inner, AHBFNet):
            raise ValueError(f"method ahbf trains model 'ahbf' (hierarchical branches), got {type(inner).__name__}; "
                             f"set model.name: ahbf")
        v, need = self.cfg.variant, FUSION_OF[self.cfg.variant]
        if v == "vanilla":
            if inner.num_branches != 1:
                raise ValueError(f"variant 'vanilla' trains the target network alone: set model.args.branches: 1 and "
                                 f"model.args.fusion: none (the model has {inner.num_branches} branches)")
            return
        if inner.num_branches < 2:
            raise ValueError(f"variant {v!r} distils between branches: set model.args.branches >= 2")
        if inner.fusion != need:
            raise ValueError(f"variant {v!r} needs model.args.fusion: {need} (the model was built with "
                             f"fusion {inner.fusion!r})")

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, epoch: float) -> dict[str, Tensor]:
        out = model(x)
        if not isinstance(out, AHBFOutput):
            raise ValueError("the ahbf method needs an 'ahbf' model (its forward returns AHBFOutput)")
        cfg = self.cfg
        self.omega = rampup(epoch, self.rampup_epochs)
        kd = dict(tau=cfg.tau, omega=self.omega, detach_teacher=cfg.detach_teacher)
        if cfg.variant == "ahbf":
            authors = cfg.objective == "authors"
            parts = ahbf_loss(out.branches, out.tas, y, lambda1=cfg.lambda1, lambda2=cfg.lambda2,
                              lambda3=cfg.lambda1 if authors else 0.0, kd_scale=AUTHORS_KD_SCALE if authors else 1.0,
                              **kd)
        elif cfg.variant == "one":
            if out.ensemble is None:
                raise ValueError("variant 'one' needs a model built with fusion: one")
            parts = one_loss(out.branches, out.ensemble, y, weight=cfg.kd_weight, **kd)
        elif cfg.variant == "cl":
            parts = cl_loss(out.branches, y, weight=cfg.kd_weight, **kd)
        elif cfg.variant == "dml":
            parts = dml_loss(out.branches, y, weight=cfg.kd_weight, **kd)
        else:
            ce = labelled_ce([out.logits], y)
            parts = {"loss": ce, "ce_branches": ce}
        result = {k: (v if k == "loss" else v.detach()) for k, v in parts.items()}
        if cfg.variant != "vanilla":
            result["omega"] = torch.tensor(self.omega)
        for m, s in enumerate(out.scores if cfg.variant == "ahbf" else (), start=2):
            result[f"s_branch{m}"] = s[:, 0].detach().mean()  # attention on branch m vs the previous TA
        return result

    def log_values(self) -> dict[str, float]:
        return {"omega": self.omega} if self.cfg.variant != "vanilla" else {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: Any) -> dict[str, Any]:
        """Accuracy of the target branch (``accuracy``, the deployed student), of every branch
        (``accuracy_branch1`` … in hierarchy order, 1-based as in the paper), of every teacher
        assistant (``accuracy_ta2`` …) or ONE's ensemble (``accuracy_ensemble``), and of the
        mean of the branch logits (``accuracy_branch_mean``); ``macs``/``params`` of the student
        per sample and ``train_macs``/``train_params`` of the whole training model.
        """
        inner = unwrap(model)
        if isinstance(inner, AHBFStudent):  # an extracted student: a plain one-stage model
            return evaluate_model(inner, loader, device)
        if not isinstance(inner, AHBFNet):
            raise ValueError(f"the ahbf method evaluates 'ahbf' models, got {type(inner).__name__}")
        correct: dict[str, int] = {}
        total, loss_sum = 0, 0.0
        shape: tuple[int, ...] = ()
        with eval_mode(inner):
            for x, y in labelled_batches(loader):
                x, y = x.to(device), y.to(device)
                shape = tuple(int(d) for d in x.shape[1:])
                out = inner(x)
                named = {f"branch{m}": z for m, z in enumerate(out.branches, start=1)}
                named.update({f"ta{m}": z for m, z in enumerate(out.tas, start=2)})
                if out.ensemble is not None:
                    named["ensemble"] = out.ensemble
                if len(out.branches) > 1:
                    named["branch_mean"] = torch.stack(out.branches).mean(0)
                for k, z in named.items():
                    correct[k] = correct.get(k, 0) + int((z.argmax(1) == y).sum())
                loss_sum += float(F.cross_entropy(out.logits.float(), y, reduction="sum"))
                total += int(y.numel())
        result: dict[str, Any] = {"accuracy": correct[f"branch{inner.target + 1}"] / total, "loss": loss_sum / total,
                                  "n": total, "target_branch": inner.target + 1}
        result.update({f"accuracy_{k}": c / total for k, c in correct.items()})
        result.update(self._costs(inner, shape, device))
        return result

    def _costs(self, model: AHBFNet, shape: tuple[int, ...], device: Any) -> dict[str, int]:
        key = (id(model), shape)
        if key not in self._cost_cache:
            from kdedge.models.flops import count_cost

            x = torch.zeros(1, *shape, device=device)
            student, full = count_cost(model.student().to(device), x), count_cost(model, x)
            self._cost_cache[key] = {"macs": student.macs, "params": student.params,
                                     "train_macs": full.macs, "train_params": full.params}
        return dict(self._cost_cache[key])


__all__ = ["AUTHORS_KD_SCALE", "AHBFConfig", "AHBFTask", "OBJECTIVES", "VARIANTS"]
