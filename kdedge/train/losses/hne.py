"""Losses of hierarchical neural ensembles (Ruiz & Verbeek, AAAI 2021, §3.2-3.3).

Notation: N = 2^B members with logits z_1 … z_N (depth-first order, a tensor [N, batch, K]),
labels y (``-100`` = unlabelled), the sub-ensemble of the first 2^b members
y_b = 1/2^b Σ_{n ≤ 2^b} z_n (Eq. 1), the full ensemble y_E = y_B, temperature T.
CE(y, z) is the cross-entropy of softmax(z) against the label, averaged over the labelled
samples of the batch (the paper sums over the training set; a batch mean is the usual SGD
estimate of it). Sums over members and over ensemble sizes are kept as the paper writes them:
with a sum each member's own parameters get the gradient of one network's CE, whatever N.

- L_I, Eq. 3: Σ_n CE(y, z_n), independent training of every member.
- L_S, Eq. 4: Σ_{b=0}^{B} CE(y, y_b), every nested sub-ensemble trained on the labels.
- L_D, Eq. 5: Σ_n ℓ^T(z_n, y_E), co-distillation of every member towards the ensemble;
  used as (1-α)·L_I + α·L_D.
- L_HD, Eq. 6: Σ_{b=0}^{B-1} ℓ^T(y_b, y_E), hierarchical distillation of every sub-ensemble
  smaller than the full one towards it; used as (1-α)·L_I + α·L_HD (paper §4.1).

ℓ^T(s, t) = -T² Σ_k softmax(t/T)_k log softmax(s/T)_k, averaged over EVERY sample of the batch,
labelled or not: distillation needs no label, which makes L_D and L_HD semi-supervised for
free (as the multi-exit paper does for its exits). The teacher y_E is detached: "the gradients
of y_E w.r.t. Θ are not back-propagated" (§3.3). The paper's soft-label cross-entropy does not
state the T² factor; we keep it (Hinton et al. 2015, and the multi-exit paper's Eq. 2) so that
the distillation gradient does not shrink as 1/T, which matters when T is annealed. With T = 2
it weights the distillation term by 4 relative to a T-free soft cross-entropy.

Adaptive temperature annealing (multi-exit paper §3.4), optional: after every batch, if the
batch mean of max_k softmax(y_E/T)_k exceeds μ, then T ← 1.05·T (T only grows).

Every function here is pure; the task (:mod:`kdedge.train.tasks.hne`) owns T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdedge.train.labels import IGNORE_INDEX  # noqa: F401 (re-exported: the label of an unlabelled sample)
from kdedge.train.losses.common import anneal_temperature, labelled_cross_entropy, soft_cross_entropy  # noqa: F401 (re-exported)

LOSSES = ("i", "s", "d", "hd")

__all__ = ["LOSSES", "sub_ensembles", "labelled_cross_entropy", "soft_cross_entropy", "independent_loss",
           "nested_loss", "codistillation_loss", "hierarchical_distillation_loss", "hne_loss",
           "ensemble_confidence", "anneal_temperature"]


def _check_members(z: Tensor) -> int:
    """B for member logits [N, batch, K] with N a power of two."""
    if z.dim() != 3:
        raise ValueError(f"member logits must be [members, batch, classes], got shape {tuple(z.shape)}")
    n = z.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError(f"an HNE has 2^B members, got {n}")
    return n.bit_length() - 1


def sub_ensembles(z: Tensor) -> Tensor:
    """The nested sub-ensemble outputs of Eq. 1, y_b = 1/2^b Σ_{n ≤ 2^b} z_n for b = 0 … B.

    Args:
        z: member logits [N, batch, K], depth-first order.

    Returns:
        [B+1, batch, K]; the last one is the full ensemble y_E.

    Example:
        >>> sub_ensembles(torch.tensor([[[0.0]], [[2.0]]])).flatten().tolist()
        [0.0, 1.0]
    """
    B = _check_members(z)
    csum = z.cumsum(0)
    sizes = [2 ** b for b in range(B + 1)]
    return torch.stack([csum[s - 1] / s for s in sizes])


def independent_loss(z: Tensor, y: Tensor) -> Tensor:
    """L_I, Eq. 3: Σ_{n=1}^{N} CE(y, z_n).

    Args:
        z: member logits [N, batch, K].
        y: labels [batch]; ``-100`` marks unlabelled samples (they contribute nothing).

    Example:
        >>> independent_loss(torch.zeros(2, 1, 4), torch.tensor([0]))  # 2 · log 4
        tensor(2.7726)
    """
    _check_members(z)
    return torch.stack([labelled_cross_entropy(zn, y) for zn in z]).sum()


def nested_loss(z: Tensor, y: Tensor) -> Tensor:
    """L_S, Eq. 4: Σ_{b=0}^{B} CE(y, y_b), with y_b the mean logits of the first 2^b members.

    Args:
        z: member logits [N, batch, K].
        y: labels [batch]; ``-100`` marks unlabelled samples.
    """
    return torch.stack([labelled_cross_entropy(yb, y) for yb in sub_ensembles(z)]).sum()


def codistillation_loss(z: Tensor, T: float) -> Tensor:
    """L_D, Eq. 5: Σ_{n=1}^{N} ℓ^T(z_n, y_E), every member towards the detached ensemble.

    Args:
        z: member logits [N, batch, K]; every sample counts (no labels used).
        T: temperature.
    """
    _check_members(z)
    teacher = z.detach().mean(0)
    return torch.stack([soft_cross_entropy(zn, teacher, T) for zn in z]).sum()


def hierarchical_distillation_loss(z: Tensor, T: float) -> Tensor:
    """L_HD, Eq. 6: Σ_{b=0}^{B-1} ℓ^T(y_b, y_E), every smaller sub-ensemble towards the detached
    full ensemble. Zero (with a connected graph) when B = 0.

    Only the members of sub-ensembles smaller than N receive a gradient: the second half of the
    members appears only in the teacher.

    Args:
        z: member logits [N, batch, K]; every sample counts (no labels used).
        T: temperature.
    """
    ys = sub_ensembles(z)
    teacher = ys[-1].detach()
    if len(ys) == 1:
        return z.float().sum() * 0.0
    return torch.stack([soft_cross_entropy(yb, teacher, T) for yb in ys[:-1]]).sum()


def hne_loss(z: Tensor, y: Tensor, loss: str = "hd", T: float = 2.0, alpha: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """The training objective of an HNE.

    - ``"i"``: L_I (Eq. 3);  ``"s"``: L_S (Eq. 4);
    - ``"d"``: (1-α)·L_I + α·L_D (Eq. 5, §3.3);  ``"hd"``: (1-α)·L_I + α·L_HD (Eq. 6, §4.1).

    Args:
        z: member logits [N, batch, K], depth-first order.
        y: labels [batch], ``-100`` for unlabelled samples (no CE; distillation still applies).
        loss: which objective.
        T: distillation temperature (``d``, ``hd``).
        alpha: weight of the distillation term, in [0, 1] (``d``, ``hd``).

    Returns:
        (total, ce, kd): the scalar to minimise, its label term (L_I or L_S) and its
        distillation term (L_D or L_HD, zero for ``i`` and ``s``).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown hne loss {loss!r}; use one of {', '.join(LOSSES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if loss == "s":
        ce = nested_loss(z, y)
        return ce, ce, ce.detach() * 0.0
    ce = independent_loss(z, y)
    if loss == "i":
        return ce, ce, ce.detach() * 0.0
    kd = codistillation_loss(z, T) if loss == "d" else hierarchical_distillation_loss(z, T)
    return (1.0 - alpha) * ce + alpha * kd, ce, kd


@torch.no_grad()
def ensemble_confidence(z: Tensor, T: float) -> Tensor:
    """Temperature-adjusted confidence of the teacher: the batch mean of max_k softmax(y_E/T)_k.

    Args:
        z: member logits [N, batch, K].
        T: temperature.
    """
    _check_members(z)
    return torch.softmax(z.detach().float().mean(0) / T, dim=-1).amax(-1).mean()
