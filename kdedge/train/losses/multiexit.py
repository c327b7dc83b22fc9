"""Losses of distillation-based training for multi-exit networks (Phuong & Lampert, ICCV 2019).

Notation: M exits with logits z_1 … z_M (first exit first), p_m = softmax(z_m), labels y
(``-100`` = unlabelled), temperature τ, teacher sets 𝒯(m) ⊂ {1 … M}. Exits are numbered from 0
in code (exit m in the text is index m-1).

- exit-wise loss, Eq. 7 (= the classification loss L_cls of Eq. 5):
  L_cls = 1/M Σ_m CE(y, p_m), each CE averaged over the labelled samples of the batch.
- temperature-scaled cross-entropy, Eq. 2: ℓ^τ(t, s) = -τ² Σ_k softmax(z_t/τ)_k log softmax(z_s/τ)_k,
  the teacher side detached (Alg. 1, line 7: "partial detaching").
- distillation loss, Eq. 4: L_dist = 1/M Σ_m 1/|𝒯(m)| Σ_{t∈𝒯(m)} ℓ^τ(p_t, p_m), averaged over every
  sample of the batch, labelled or not (an empty 𝒯(m) adds nothing).
- total, Eq. 1 (Eq. 6 with unlabelled samples): L = 2·[(1-C)·L_cls + C·L_dist]. C = 0.5 gives the
  paper's L_cls + L_dist exactly; the weight C is the authors' code's (see docs/multiexit.md).
- temperature annealing, §3.4 / Alg. 1 line 11: after every batch, if the mean over the batch of
  max_k [1/|𝒯(:)| Σ_{t∈𝒯(:)} softmax(z_t/τ)]_k exceeds μ, then τ ← τ·τ* (τ only grows).

Every function here is pure: the task (:mod:`kdedge.train.tasks.multiexit`) owns τ.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from kdedge.train.labels import IGNORE_INDEX  # noqa: F401 (re-exported: the label of an unlabelled sample)
from kdedge.train.losses.common import anneal_temperature, labelled_cross_entropy, soft_cross_entropy  # noqa: F401 (re-exported)

TEACHER_CHOICES = ("last", "later")

TeacherSpec = str | Sequence[Sequence[int]]


def teacher_sets(teachers: TeacherSpec, num_exits: int) -> list[tuple[int, ...]]:
    """The teacher set 𝒯(m) of every exit, as 0-based exit indices.

    Args:
        teachers: ``"last"`` (𝒯(m) = {M} for m < M, the paper's default), ``"later"`` (𝒯(m) =
            {m+1 … M}, the paper's appendix A.2), or an explicit list of ``num_exits`` lists of
            0-based exit indices (e.g. ``[[2], [2], []]``).
        num_exits: M.

    Returns:
        ``num_exits`` tuples; the last exit's is empty for ``"last"`` and ``"later"``.

    Raises:
        ValueError: an unknown name, a list of the wrong length, or an index outside 0..M-1 or
            equal to the student's own.

    Example:
        >>> teacher_sets("later", 3)
        [(1, 2), (2,), ()]
    """
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be a positive integer, got {num_exits!r}")
    last = num_exits - 1
    if isinstance(teachers, str):
        if teachers == "last":
            return [(last,)] * last + [()]
        if teachers == "later":
            return [tuple(range(m + 1, num_exits)) for m in range(num_exits)]
        raise ValueError(f"unknown teacher set {teachers!r}; use 'last', 'later' or a list of {num_exits} lists "
                         f"of exit indices")
    sets = [list(t) for t in teachers]
    if len(sets) != num_exits:
        raise ValueError(f"an explicit teacher set needs one list per exit ({num_exits}), got {len(sets)}; "
                         f"e.g. [[{last}]] * {last} + [[]]")
    out = []
    for m, ts in enumerate(sets):
        for t in ts:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= last:
                raise ValueError(f"teacher set of exit {m} names exit {t!r}, but the network has exits 0..{last}; "
                                 f"use 0-based exit indices")
            if t == m:
                raise ValueError(f"teacher set of exit {m} names the exit itself; an exit cannot teach itself")
        if len(set(ts)) != len(ts):
            raise ValueError(f"teacher set of exit {m} repeats an exit: {ts}")
        out.append(tuple(ts))
    return out


def exitwise_loss(logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """Exit-wise loss, Eq. 7 (= L_cls, Eq. 5): 1/M Σ_m CE(y, p_m) over labelled samples.

    Args:
        logits: M tensors [N, K], first exit first.
        y: labels [N]; ``-100`` marks unlabelled samples (they contribute nothing).

    Example:
        >>> exitwise_loss([torch.zeros(2, 4)] * 3, torch.tensor([0, 1]))  # log 4
        tensor(1.3863)
    """
    if len(logits) == 0:
        raise ValueError("exitwise_loss needs at least one exit")
    return torch.stack([labelled_cross_entropy(z, y) for z in logits]).mean()


def distillation_loss(logits: Sequence[Tensor], teachers: Sequence[Sequence[int]], T: float) -> Tensor:
    """Distillation loss L_dist, Eq. 4: 1/M Σ_m 1/|𝒯(m)| Σ_{t∈𝒯(m)} ℓ^τ(p_t, p_m).

    Every sample counts (labels are not used), which is what makes Eq. 6 semi-supervised.

    Args:
        logits: M tensors [N, K].
        teachers: output of :func:`teacher_sets` for M exits.
        T: temperature τ.
    """
    if len(teachers) != len(logits):
        raise ValueError(f"{len(teachers)} teacher sets for {len(logits)} exits")
    terms = []
    for m, ts in enumerate(teachers):
        if ts:
            terms.append(torch.stack([soft_cross_entropy(logits[m], logits[t], T) for t in ts]).mean())
    if not terms:
        return logits[0].float().sum() * 0.0
    return torch.stack(terms).sum() / len(logits)


def multiexit_loss(logits: Sequence[Tensor], y: Tensor, teachers: Sequence[Sequence[int]], T: float,
                   C: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Distillation-based training objective, Eq. 1 (Eq. 6 when some labels are -100):
    L = 2·[(1-C)·L_cls + C·L_dist]; C = 0.5 is exactly the paper's L_cls + L_dist.

    Args:
        logits: M tensors [N, K], first exit first.
        y: labels [N], ``-100`` for unlabelled samples (no CE, distillation still applies).
        teachers: teacher sets (:func:`teacher_sets`).
        T: temperature τ.
        C: weight of the distillation term, in [0, 1].

    Returns:
        (total, L_cls, L_dist); only ``total`` needs a backward pass.
    """
    if not 0.0 <= C <= 1.0:
        raise ValueError(f"C must be in [0, 1], got {C!r}")
    cls = exitwise_loss(logits, y)
    dist = distillation_loss(logits, teachers, T)
    return 2.0 * ((1.0 - C) * cls + C * dist), cls, dist


@torch.no_grad()
def teacher_confidence(logits: Sequence[Tensor], teachers: Sequence[Sequence[int]], T: float) -> Tensor | None:
    """Temperature-adjusted teacher confidence of Alg. 1, line 11: the batch mean of
    max_k [1/|𝒯(:)| Σ_{t∈𝒯(:)} softmax(z_t/τ)]_k, with 𝒯(:) the union of all teacher sets.

    Returns None when no exit is a teacher (nothing to anneal).
    """
    union = sorted({t for ts in teachers for t in ts})
    if not union:
        return None
    probs = torch.stack([torch.softmax(logits[t].detach().float() / T, dim=-1) for t in union]).mean(0)
    return probs.max(dim=-1).values.mean()
