"""Loss pieces the distillation methods share (HNE, multi-exit), as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdedge.train.labels import IGNORE_INDEX


def labelled_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """CE(y, softmax(logits)) averaged over labelled samples (``y != -100``); 0 if there are none.

    The zero keeps the graph connected (every parameter gets a zero gradient), so DDP stays in
    step when a batch holds only unlabelled samples.
    """
    labelled = (y != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.clamp(min=1)


def soft_cross_entropy(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """Temperature-scaled cross-entropy (multi-exit paper Eq. 2), averaged over the batch:
    ℓ^T = -T² Σ_k softmax(teacher/T)_k · log softmax(student/T)_k. The teacher is detached.

    The T² factor keeps the gradient's scale independent of T: the gradient w.r.t. the student
    logits is T·(softmax(student/T) − softmax(teacher/T)).

    Args:
        student: logits [N, K] (gets the gradient).
        teacher: logits [N, K] (treated as constant).
        T: the temperature > 0.
    """
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T!r}")
    target = torch.softmax(teacher.detach().float() / T, dim=-1)
    return -(T * T) * (target * torch.log_softmax(student.float() / T, dim=-1)).sum(-1).mean()


def anneal_temperature(T: float, confidence: float, mu: float, factor: float = 1.05) -> float:
    """Adaptive temperature annealing (multi-exit paper §3.4): T·factor if the teacher's
    temperature-adjusted confidence exceeds μ, else T unchanged (T never decreases).

    Example:
        >>> anneal_temperature(1.0, 0.7, mu=0.5)
        1.05
    """
    if not factor > 1.0:
        raise ValueError(f"the annealing factor must be > 1, got {factor!r}")
    return T * factor if confidence > mu else T
