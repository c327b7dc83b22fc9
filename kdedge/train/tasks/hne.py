"""Training and evaluation of hierarchical neural ensembles (Ruiz & Verbeek, AAAI 2021).

``loss: hd`` (default) is the paper's hierarchical distillation, (1-α)·L_I + α·L_HD; ``i``, ``s``
and ``d`` are the objectives it is compared with (Table 1, Fig. 3). Samples labelled -100 (the
data layer's unlabelled pool) enter the distillation term only: semi-supervised L_HD / L_D.
With ``anneal: true`` the temperature grows by ``anneal_factor`` after every batch whose
full-ensemble confidence at the current T exceeds μ (the multi-exit paper's §3.4).

Evaluation reports what the paper plots: accuracy of the ensembles of 1, 2, 4 … N members (the
deployed anytime prediction, mean of logits) with their cumulative MACs, accuracy of every
member, the diversity of each ensemble (std of the member logits, averaged over classes and
samples), and the measured complexity of the tree against the paper's T_HNE and R (Eq. 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdedge.models.hne import HNE
from kdedge.train.distributed import mean_over_ranks, unwrap
from kdedge.train.evaluate import eval_mode, labelled_batches
from kdedge.train.fields import check_ranges, number
from kdedge.train.losses.hne import LOSSES, anneal_temperature, ensemble_confidence, hne_loss
from kdedge.train.task import GROWTH, MAX_TEMPERATURE, TEMPERATURE, Task, TemperatureState

__all__ = ["HNEConfig", "HNETask", "member_logits", "summarize", "complexity"]


@dataclass
class HNEConfig:
    """The ``loss:`` section of an HNE recipe.

    Args:
        loss: ``hd`` (1-α)·L_I + α·L_HD (Eq. 6, the paper's method); ``d`` (1-α)·L_I + α·L_D
            (co-distillation, Eq. 5); ``i`` L_I (independent, Eq. 3); ``s`` L_S (nested, Eq. 4).
        T: distillation temperature (paper: 2); the initial one when annealing.
        alpha: weight of the distillation term (paper: 0.5).
        anneal: adaptive temperature annealing instead of a fixed T.
        mu: confidence bound of the annealing (multi-exit paper: 0.5 on CIFAR-100, 0.1 on ImageNet).
        anneal_factor: T is multiplied by this when the bound is exceeded (multi-exit paper: 1.05).
    """

    loss: str = "hd"
    T: float = number(2.0, gt=0, le=MAX_TEMPERATURE, what=TEMPERATURE)
    alpha: float = number(0.5, ge=0, le=1)
    anneal: bool = False
    mu: float = number(0.5, gt=0, lt=1, what="a confidence bound in (0, 1)")
    anneal_factor: float = number(1.05, gt=1, le=10, what=GROWTH)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss.loss must be one of {', '.join(LOSSES)} (hd = the paper's hierarchical "
                             f"distillation), got {self.loss!r}")
        check_ranges(self, "loss")


class HNETask(TemperatureState, Task):
    """Train an ``hne`` model with L_I, L_S, L_D or L_HD; evaluate it as an anytime ensemble."""

    name = "hne"
    Config: ClassVar[type] = HNEConfig
    families: ClassVar[tuple[str, ...]] = ("hne",)
    default_model: ClassVar[dict] = {"name": "hne", "args": {"config": "mnist", "B": 2}}

    def __init__(self, cfg: HNEConfig, *, num_classes: int, epochs: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.temperature = float(cfg.T)
        self._cost_cache: dict[tuple[int, tuple[int, ...]], list[int]] = {}

    def check_model(self, model: nn.Module) -> None:
        inner = unwrap(model)
        if not isinstance(inner, HNE):
            raise ValueError(f"method 'hne' trains hierarchical neural ensembles, not {type(inner).__name__}; "
                             f"set model.name: hne in the recipe (e.g. model: {{name: hne, args: {{config: mnist, B: 2}}}})")
        if inner.num_classes != self.num_classes:
            raise ValueError(f"the model has {inner.num_classes} classes but the data {self.num_classes}")

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, epoch: float) -> dict[str, Tensor]:
        z = model(x)
        if not isinstance(z, Tensor) or z.dim() != 3:
            raise ValueError("method 'hne' needs a model whose forward returns member logits [members, batch, "
                             "classes] (model.name: hne)")
        T = self.temperature
        loss, ce, kd = hne_loss(z, y, self.cfg.loss, T, self.cfg.alpha)
        out = {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}
        if self.cfg.loss in ("d", "hd"):
            conf = mean_over_ranks(ensemble_confidence(z, T))
            out["teacher_conf"] = conf
            if self.cfg.anneal:
                self.temperature = anneal_temperature(T, float(conf), self.cfg.mu, self.cfg.anneal_factor)
        return out

    def log_values(self) -> dict[str, float]:
        return {"temperature": self.temperature} if self.cfg.loss in ("d", "hd") else {}

    # -- evaluation -----------------------------------------------------------------------------

    def _stage_macs(self, model: HNE, input_shape: tuple[int, ...]) -> list[int]:
        from kdedge.models.flops import stage_costs

        key = (id(model), input_shape)
        if key not in self._cost_cache:
            self._cost_cache[key] = [int(c.macs) for c in stage_costs(model.stages(), input_shape)]  # type: ignore[arg-type]
        return self._cost_cache[key]

    def evaluate(self, model: nn.Module, loader: Any, device: Any) -> dict[str, Any]:
        """Anytime accuracy, per-member accuracy, diversity and MACs of an HNE on ``loader``.

        ``accuracy`` is that of the full ensemble (mean of all members' logits). See
        :func:`summarize` for the other keys.
        """
        inner = unwrap(model)
        self.check_model(inner)
        z, labels, shape = member_logits(inner, loader, device)
        return summarize(z, labels, self._stage_macs(inner, shape), inner.B)  # type: ignore[arg-type]


@torch.no_grad()
def member_logits(model: HNE, loader: Any, device: Any) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Every member's logits over a loader, labelled samples only, in one grouped pass a batch.

    Returns:
        (logits [N, samples, K] float32 on the CPU, labels [samples], input shape (C, H, W)).

    Raises:
        ValueError: the loader holds no labelled sample.
    """
    chunks: list[Tensor] = []
    labels: list[Tensor] = []
    shape: tuple[int, ...] = ()
    with eval_mode(model):
        for x, y in labelled_batches(loader):
            x = x.to(device)
            shape = tuple(int(d) for d in x.shape[1:])
            chunks.append(model(x).float().cpu())
            labels.append(y.cpu())
    return torch.cat(chunks, dim=1), torch.cat(labels), shape


def complexity(stage_macs: list[int], B: int) -> dict[str, Any]:
    """Measured cost of the tree against the paper's analysis (§3.1).

    Per-node block costs c_d follow from the stage costs: stage 1 is one leaf node
    (c_B), stage b is one node of block B−b+1 plus two copies of stage b−1's sub-tree, and
    stage 0 is one node of every block. Then T_HNE = Σ_d 2^d·c_d (measured) and
    T_Ind = N·Σ_d c_d; the paper's formulas assume equal blocks, c_d = C for all d:
    T_HNE = (2^(B+1) − 1)·C and R = T_Ind / T_HNE = (B+1) / (2 − 2^−B) (Eq. 2).
    """
    c = [0] * (B + 1)
    prev = 0
    for b in range(1, B + 1):
        c[B - b + 1] = stage_macs[b] - 2 * prev
        prev = stage_macs[b]
    c[0] = stage_macs[0] - sum(c[1:])
    member = stage_macs[0]
    tree = sum(2 ** d * cd for d, cd in enumerate(c))
    n = 2 ** B
    mean_block = member / (B + 1)
    return {
        "block_macs": c,
        "member_macs": member,
        "tree_macs": tree,
        "tree_macs_equal_blocks": (2 ** (B + 1) - 1) * mean_block,
        "independent_macs": n * member,
        "speedup": n * member / tree if tree else 1.0,
        "speedup_eq2": (B + 1) / (2 - 2.0 ** -B),
    }


def summarize(z: Tensor, labels: Tensor, stage_macs: list[int], B: int) -> dict[str, Any]:
    """The JSON-able evaluation record of member logits ``z`` [N, samples, K].

    Keys: ``accuracy`` (full ensemble), ``combine`` (``mean_logits``), ``stages`` (per ensemble
    size 2^b: ``members``, ``accuracy_mean_logits``, ``macs`` cumulative, ``diversity``),
    ``ensemble_accuracy`` and ``ensemble_macs`` (the same as lists), ``member_accuracy`` (each
    member alone, depth-first order), ``diversity`` (per ensemble size: std over its members'
    logits, averaged over classes and samples; 0 for one member), ``complexity``
    (:func:`complexity`), ``curves`` (``hne``: [[MACs, accuracy]] per ensemble size) and ``n``;
    ``ensemble_top5`` when there are more than five classes.
    """
    n_members = z.shape[0]
    if n_members != 2 ** B or len(stage_macs) != B + 1:
        raise ValueError(f"{n_members} members and {len(stage_macs)} stage costs do not fit a tree with B={B}")
    macs = [int(v) for v in torch.tensor(stage_macs, dtype=torch.int64).cumsum(0).tolist()]
    sizes = [2 ** b for b in range(B + 1)]
    acc, top5, div = [], [], []
    for s in sizes:
        mean = z[:s].mean(0)
        acc.append(float((mean.argmax(-1) == labels).float().mean()))
        if z.shape[-1] > 5:
            top = mean.topk(5, dim=-1).indices
            top5.append(float((top == labels[:, None]).any(-1).float().mean()))
        div.append(float(z[:s].std(dim=0).mean()) if s > 1 else 0.0)
    per_member = [float((z[n].argmax(-1) == labels).float().mean()) for n in range(n_members)]
    out: dict[str, Any] = {
        "accuracy": acc[-1],
        "combine": "mean_logits",
        "stages": [{"stage": b, "members": sizes[b], "accuracy_mean_logits": acc[b], "macs": macs[b],
                    "diversity": div[b]} for b in range(B + 1)],
        "ensemble_accuracy": acc,
        "ensemble_macs": macs,
        "member_accuracy": per_member,
        "diversity": div,
        "complexity": complexity(list(stage_macs), B),
        "curves": {"hne": [[m, a] for m, a in zip(macs, acc)]},
        "n": int(labels.numel()),
    }
    if top5:
        out["ensemble_top5"] = top5
    return out
