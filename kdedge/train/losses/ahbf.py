"""AHBF-OKD losses (Gong et al., AAAI 2023) and the online-distillation baselines it is compared with.

Pure functions of logits. Notation: z^m are branch m's logits (m = 1 … M, hierarchy order,
``branches[m-1]``), z^ta(m) the m-th teacher assistant's logits (``tas[m-2]``, m = 2 … M;
z^ta(1) = z^1), τ the temperature, p̃ = softmax(z / τ).

Objective. The paper's L_FKL (Eq. 11) has two KL families, TAKL and BTKL. The authors' training
code adds a third, TBKL: each assistant also teaches its own branch, weighted by λ1 like TAKL,
and scales all distillation by 0.75 (their latest commit: kd_weight 1.5 × a 0.5 ramp-up factor).
:func:`ahbf_loss` takes both as arguments (``lambda3``, ``kd_scale``); the defaults are the
paper's (0 and 1).

Teacher side. Every distillation term here reads KL(teacher ‖ student). With
``detach_teacher=True`` no gradient flows into the teacher's logits through that term: knowledge
flows one way, from the deeper branch / larger assistant to the smaller one, as in classic KD.
With ``False`` both sides get gradients (what the authors' AHBF code does). See docs/ahbf.md.

Unlabelled samples (label ``IGNORE_INDEX`` = -100) get no cross-entropy; the distillation terms
need no labels and use every sample of the batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdedge.train.labels import IGNORE_INDEX


def soft_kl(student: Tensor, teacher: Tensor, tau: float, detach_teacher: bool = True) -> Tensor:
    """Hinton's distillation term (paper Eq. 4), averaged over the batch.

        L_KD = τ² · Σ_c p̃_c^t · log(p̃_c^t / p̃_c^s),   p̃ = softmax(z / τ)

    Args:
        student: student logits [N, K].
        teacher: teacher logits [N, K].
        tau: temperature τ > 0.
        detach_teacher: stop the gradient into ``teacher``.

    Returns:
        A scalar: the sum over classes, mean over the N samples, times τ².
    """
    t = teacher.detach() if detach_teacher else teacher
    log_ps = F.log_softmax(student.float() / tau, dim=1)
    log_pt = F.log_softmax(t.float() / tau, dim=1)
    return tau * tau * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def labelled_ce(logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """Σ_m L_CE^m (paper Eq. 2) over a list of logits, each a mean over the labelled samples.

        L = Σ_m (1/|L|) Σ_{i∈L} −log softmax(z_i^m)[y_i],   L = {i : y_i ≠ −100}

    A batch without labelled samples gives 0 (still connected to the graph, so DDP stays in step).
    """
    if not logits:
        raise ValueError("labelled_ce needs at least one logits tensor")
    if not bool((y != IGNORE_INDEX).any()):
        return sum(z.sum() for z in logits) * 0.0  # type: ignore[return-value]
    return sum(F.cross_entropy(z.float(), y, ignore_index=IGNORE_INDEX) for z in logits)  # type: ignore[return-value]


def rampup(epoch: float, rampup_epochs: float) -> float:
    """The ramp-up weight of the distillation loss (paper Eq. 13).

        ω(i) = exp(−5 · (1 − i/E)²)  for i < E,   1 for i ≥ E

    Args:
        epoch: i, the (fractional) epoch, counted from 0.
        rampup_epochs: E; E <= 0 disables the ramp-up (ω = 1).

    Example:
        >>> round(rampup(0, 300), 4), round(rampup(150, 300), 4), rampup(300, 300)
        (0.0067, 0.2865, 1.0)
    """
    if rampup_epochs <= 0:
        return 1.0
    r = min(max(epoch / rampup_epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - r) ** 2)


def _check_tas(branches: Sequence[Tensor], tas: Sequence[Tensor]) -> None:
    if len(branches) < 2 or len(tas) != len(branches) - 1:
        raise ValueError(f"AHBF losses need M >= 2 branches and M-1 teacher assistants, got "
                         f"{len(branches)} branches and {len(tas)} assistants (build the model with fusion 'ahbf')")


def takl_loss(branches: Sequence[Tensor], tas: Sequence[Tensor], tau: float, detach_teacher: bool = True) -> Tensor:
    """Σ_{m=2}^{M} L_TAKL^m: each assistant teaches the previous one (paper Eq. 9).

        L_TAKL^m = τ² · Σ_c p̃_c^ta(m) · log(p̃_c^ta(m) / p̃_c^ta(m−1)),   z^ta(1) = z^1
    """
    _check_tas(branches, tas)
    prev = [branches[0], *tas[:-1]]
    return sum(soft_kl(p, t, tau, detach_teacher) for p, t in zip(prev, tas))  # type: ignore[return-value]


def btkl_loss(branches: Sequence[Tensor], tas: Sequence[Tensor], tau: float, detach_teacher: bool = True) -> Tensor:
    """Σ_{m=2}^{M} L_BTKL^m: branch m teaches the previous assistant (paper Eq. 10).

        L_BTKL^m = τ² · Σ_c p̃_c^m · log(p̃_c^m / p̃_c^ta(m−1)),   z^ta(1) = z^1
    """
    _check_tas(branches, tas)
    prev = [branches[0], *tas[:-1]]
    return sum(soft_kl(p, z, tau, detach_teacher) for p, z in zip(prev, branches[1:]))  # type: ignore[return-value]


def tbkl_loss(branches: Sequence[Tensor], tas: Sequence[Tensor], tau: float, detach_teacher: bool = True) -> Tensor:
    """Σ_{m=2}^{M} L_TBKL^m: each assistant teaches its own branch (the authors' code, not the paper).

        L_TBKL^m = τ² · Σ_c p̃_c^ta(m) · log(p̃_c^ta(m) / p̃_c^m)

    Their training loop adds ``criterion_T(logitlist[m-1], ensem_logits[m-2])`` (= KL(ta(m) ‖ m))
    for every m = 2 … M beside the paper's two families, weighted by λ1.
    """
    _check_tas(branches, tas)
    return sum(soft_kl(z, t, tau, detach_teacher) for z, t in zip(branches[1:], tas))  # type: ignore[return-value]


def ahbf_loss(branches: Sequence[Tensor], tas: Sequence[Tensor], y: Tensor, *, lambda1: float = 4.0,
              lambda2: float = 2.0, lambda3: float = 0.0, tau: float = 3.0, omega: float = 1.0, kd_scale: float = 1.0,
              detach_teacher: bool = True) -> dict[str, Tensor]:
    """The AHBF-OKD objective (paper Eqs. 11 and 14), optionally with the authors' third KL family.

        L_FKL = Σ_{m=2}^{M} (λ1 · L_TAKL^m + λ2 · L_BTKL^m + λ3 · L_TBKL^m)      (Eq. 11 when λ3 = 0)
        L     = Σ_{m=1}^{M} L_CE^m + Σ_{m=2}^{M} L_CE^ta(m) + s · ω(i) · L_FKL   (Eq. 14 when s = 1)

    The paper: λ3 = 0, s = 1 (the defaults). The authors' code: λ3 = λ1 and s = 0.75.

    Args:
        branches: z^1 … z^M.
        tas: z^ta(2) … z^ta(M).
        y: labels [N]; −100 marks an unlabelled sample (no CE).
        lambda1, lambda2: λ1, λ2 (the paper's best: 4 and 2).
        lambda3: λ3, weight of L_TBKL (:func:`tbkl_loss`); 0 leaves it out (not even computed).
        tau: τ (3 in the paper).
        omega: ω(i), see :func:`rampup`.
        kd_scale: s, a constant factor on the whole distillation term.
        detach_teacher: stop gradients into the teacher side of every KL family.

    Returns:
        ``{"loss", "ce_branches", "ce_tas", "takl", "btkl"}`` plus ``"tbkl"`` when λ3 > 0 (every
        part but ``loss`` unweighted).

    Example:
        >>> parts = ahbf_loss(branches, tas, y, lambda3=4.0, kd_scale=0.75)  # the authors' objective
    """
    _check_tas(branches, tas)
    ce_b = labelled_ce(branches, y)
    ce_t = labelled_ce(tas, y)
    ta_kl = takl_loss(branches, tas, tau, detach_teacher)
    bt_kl = btkl_loss(branches, tas, tau, detach_teacher)
    fkl = lambda1 * ta_kl + lambda2 * bt_kl
    parts = {"ce_branches": ce_b, "ce_tas": ce_t, "takl": ta_kl, "btkl": bt_kl}
    if lambda3:
        tb_kl = tbkl_loss(branches, tas, tau, detach_teacher)
        fkl = fkl + lambda3 * tb_kl
        parts["tbkl"] = tb_kl
    return {"loss": ce_b + ce_t + (kd_scale * omega) * fkl, **parts}


def one_loss(branches: Sequence[Tensor], ensemble: Tensor, y: Tensor, *, tau: float = 3.0, weight: float = 1.0,
             omega: float = 1.0, detach_teacher: bool = True) -> dict[str, Tensor]:
    """ONE (Lan et al. 2018): a gated ensemble teaches every branch (paper Eq. 7).

        L = Σ_{m=1}^{M} L_CE^m + L_CE^e + ω(i) · w · Σ_{m=1}^{M} τ² · KL(p̃^e ‖ p̃^m)

    Returns:
        ``{"loss", "ce_branches", "ce_ensemble", "kd"}``.
    """
    if len(branches) < 2:
        raise ValueError(f"ONE needs >= 2 branches, got {len(branches)}")
    ce_b = labelled_ce(branches, y)
    ce_e = labelled_ce([ensemble], y)
    kd = sum(soft_kl(z, ensemble, tau, detach_teacher) for z in branches)
    return {"loss": ce_b + ce_e + omega * weight * kd, "ce_branches": ce_b, "ce_ensemble": ce_e, "kd": kd}  # type: ignore[dict-item]


def cl_loss(branches: Sequence[Tensor], y: Tensor, *, tau: float = 3.0, weight: float = 1.0, omega: float = 1.0,
            detach_teacher: bool = True) -> dict[str, Tensor]:
    """Collaborative learning (Song & Chai 2018, as in the OKDDip code): each branch learns
    from the mean of the other branches' logits.

        z̄^{−m} = (1/(M−1)) Σ_{k≠m} z^k
        L = Σ_{m=1}^{M} L_CE^m + ω(i) · w · Σ_{m=1}^{M} τ² · KL(softmax(z̄^{−m}/τ) ‖ p̃^m)

    Returns:
        ``{"loss", "ce_branches", "kd"}``.
    """
    m = len(branches)
    if m < 2:
        raise ValueError(f"CL needs >= 2 branches, got {m}")
    ce_b = labelled_ce(branches, y)
    total = torch.stack(list(branches)).sum(0)
    kd = sum(soft_kl(z, (total - z) / (m - 1), tau, detach_teacher) for z in branches)
    return {"loss": ce_b + omega * weight * kd, "ce_branches": ce_b, "kd": kd}  # type: ignore[dict-item]


def dml_loss(branches: Sequence[Tensor], y: Tensor, *, tau: float = 3.0, weight: float = 1.0, omega: float = 1.0,
             detach_teacher: bool = True) -> dict[str, Tensor]:
    """Deep mutual learning (Zhang et al. 2018): every branch learns from every other one.

        L = Σ_{m=1}^{M} L_CE^m + ω(i) · w · Σ_{m=1}^{M} (1/(M−1)) Σ_{k≠m} τ² · KL(p̃^k ‖ p̃^m)

    (The DML paper uses τ = 1; set ``tau`` accordingly.)

    Returns:
        ``{"loss", "ce_branches", "kd"}``.
    """
    m = len(branches)
    if m < 2:
        raise ValueError(f"DML needs >= 2 branches, got {m}")
    ce_b = labelled_ce(branches, y)
    kd = sum(soft_kl(zs, zt, tau, detach_teacher) for i, zs in enumerate(branches)
             for j, zt in enumerate(branches) if i != j) / (m - 1)
    return {"loss": ce_b + omega * weight * kd, "ce_branches": ce_b, "kd": kd}  # type: ignore[dict-item]


__all__ = ["ahbf_loss", "btkl_loss", "cl_loss", "dml_loss", "labelled_ce", "one_loss", "rampup", "soft_kl", "takl_loss",
           "tbkl_loss"]
