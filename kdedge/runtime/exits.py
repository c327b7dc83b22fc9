"""Prediction modes of multi-exit networks, in numpy (no torch: the device runtime uses this).

Inputs are per-exit class probabilities ``probs`` of shape [E, N, K] (E exits, N samples, K
classes; :func:`softmax` turns stage logits into them), labels [N], and the cumulative cost of
reaching each exit ``costs`` [E] (e.g. MACs of stages 0..k, or measured latency).

- **Budget mode** (Phuong & Lampert §3.2): the budget is known before the input arrives; run the
  exit with the best *validation* accuracy among those whose cumulative cost fits
  (:func:`select_budget_exits`, :func:`budget_curve`).
- **Anytime mode** (§3.2): evaluate exits in turn; when stopped after exit k, predict the mean
  of the probabilities of exits 0..k (:func:`anytime_probabilities`).
- **Confidence early exit** (MSDNet's budgeted batch classification, Huang et al. 2018 §5):
  sample i leaves at the first exit k whose confidence (max probability) reaches threshold
  θ_k. :func:`fit_thresholds` fits θ on validation data so that a fraction q_k of the samples
  leave at exit k, with q_k ∝ r^k (MSDNet's geometric split); :func:`fit_thresholds_for_cost`
  searches r for the best validation accuracy within a target mean cost;
  :func:`evaluate_thresholds` scores fitted thresholds on another split.

Thresholds are plain floats: a sample exits at k when ``confidence >= θ_k``. A threshold of
:data:`NEVER` (above any probability) means no sample exits there; the last exit's threshold is
0 (every remaining sample exits). Both keep the values JSON-serialisable.

Example:
    >>> val = softmax(val_logits)              # [E, N, K]
    >>> th, fit = fit_thresholds_for_cost(val, val_labels, costs, target_cost=0.5 * costs[-1])
    >>> evaluate_thresholds(softmax(test_logits), test_labels, th, costs)["accuracy"]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from kdedge.bundle.combine import softmax  # one softmax (float64, stable) for every combine rule

NEVER = 2.0  # a threshold no probability reaches
COMBINES = ("last", "mean_probs")

__all__ = [
    "NEVER", "accuracies", "anytime_probabilities", "budget_curve", "evaluate_thresholds", "fit_thresholds",
    "fit_thresholds_for_cost", "geometric_fractions", "select_budget_exits", "softmax", "threshold_curve",
    "topk_accuracies",
]


def _check_probs(probs: Any, labels: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    p = np.asarray(probs)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    if p.ndim != 3 or 0 in p.shape:
        raise ValueError(f"probabilities must have shape [exits, samples, classes], got {p.shape}")
    if not np.isfinite(p).all():  # a NaN confidence never reaches a threshold: silently wrong exits
        raise ValueError("probabilities hold NaN or infinite values (from non-finite logits?)")
    if labels is None:
        return p, None
    y = np.asarray(labels)
    if y.shape != (p.shape[1],):
        raise ValueError(f"labels must have shape [{p.shape[1]}] to match the probabilities, got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all()
                                                   and (y == np.round(y)).all())):
        raise ValueError(f"labels must be class indices (integers), got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[2]):
        raise ValueError(f"labels must be class indices in [0, {p.shape[2]}), got values from {y.min()} to {y.max()}")
    return p, y


def _check_costs(costs: Sequence[float], num_exits: int) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (num_exits,):
        raise ValueError(f"need one cumulative cost per exit ({num_exits}), got {c.shape}")
    if not np.isfinite(c).all() or np.any(c < 0) or np.any(np.diff(c) < 0):  # NaN passes every comparison
        raise ValueError(f"costs must be cumulative (non-negative, non-decreasing), got {c.tolist()}")
    return c


def anytime_probabilities(probs: Any) -> np.ndarray:
    """Anytime mode: element k is the mean of the probabilities of exits 0..k, shape [E, N, K]."""
    p, _ = _check_probs(probs)
    return np.cumsum(p, axis=0) / np.arange(1, p.shape[0] + 1)[:, None, None]


def accuracies(probs: Any, labels: Any) -> list[float]:
    """Top-1 accuracy of each of the E predictions in ``probs`` [E, N, K]."""
    p, y = _check_probs(probs, labels)
    return [float(v) for v in (p.argmax(-1) == y[None, :]).mean(1)]


def topk_accuracies(probs: Any, labels: Any, k: int = 5) -> list[float]:
    """Top-k accuracy of each of the E predictions in ``probs`` [E, N, K] (the paper reports top-5)."""
    p, y = _check_probs(probs, labels)
    if not 1 <= k <= p.shape[2]:
        raise ValueError(f"top-k needs 1 <= k <= classes ({p.shape[2]}), got {k}")
    label_p = np.take_along_axis(p, y[None, :, None].repeat(p.shape[0], 0), axis=2)
    # rank of the true class = how many classes score strictly higher (ties count in its favour)
    rank = (p > label_p).sum(-1)
    return [float(v) for v in (rank < k).mean(1)]


def select_budget_exits(val_accuracy: Sequence[float], costs: Sequence[float],
                        budgets: Sequence[float]) -> list[int | None]:
    """Budget mode: for each budget, the exit with the best validation accuracy whose cumulative
    cost fits (ties go to the cheaper exit); None where not even the first exit fits.

    Args:
        val_accuracy: accuracy of each exit on the VALIDATION split (never the test split).
        costs: cumulative cost of reaching each exit.
        budgets: the budgets to answer for.

    Example:
        >>> select_budget_exits([0.5, 0.7, 0.65], [1, 2, 3], [0.5, 1, 2.5, 3])
        [None, 0, 1, 1]
    """
    acc = np.asarray(val_accuracy, dtype=np.float64)
    c = _check_costs(costs, len(acc))
    out: list[int | None] = []
    for b in budgets:
        fits = np.flatnonzero(c <= b)
        out.append(None if fits.size == 0 else int(fits[np.argmax(acc[fits])]))  # argmax: first max
    return out


def budget_curve(val_accuracy: Sequence[float], test_accuracy: Sequence[float],
                 costs: Sequence[float]) -> list[dict[str, float | int]]:
    """The paper's budget-mode curve: for the budget "exits 0..k are affordable" (cost
    ``costs[k]``), the exit picked on validation data and its test accuracy and cost.

    Returns:
        one dict per k: ``budget``, ``exit``, ``cost`` (of the picked exit), ``accuracy`` (test).
    """
    test = np.asarray(test_accuracy, dtype=np.float64)
    if test.shape != (len(val_accuracy),):
        raise ValueError(f"{len(val_accuracy)} validation accuracies but {test.shape} test accuracies")
    c = _check_costs(costs, len(test))
    picks = select_budget_exits(val_accuracy, c, c)
    return [{"budget": float(c[k]), "exit": int(e), "cost": float(c[e]), "accuracy": float(test[e])}  # type: ignore[index]
            for k, e in enumerate(picks)]


def geometric_fractions(num_exits: int, ratio: float) -> np.ndarray:
    """MSDNet's exit distribution: q_k ∝ ratio^(k+1), k = 0..E-1, summing to 1."""
    if num_exits < 1 or not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"need num_exits >= 1 and ratio > 0, got {num_exits}, {ratio}")
    logq = np.arange(1, num_exits + 1) * math.log(ratio)
    q = np.exp(logq - logq.max())
    return q / q.sum()


def _confidences(probs: np.ndarray, combine: str) -> tuple[np.ndarray, np.ndarray]:
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; use 'last' (each exit's own probabilities, as MSDNet) "
                         f"or 'mean_probs' (the anytime ensemble so far)")
    p = anytime_probabilities(probs) if combine == "mean_probs" else probs
    return p.max(-1), p.argmax(-1)


def fit_thresholds(probs: Any, fractions: Sequence[float], combine: str = "last") -> list[float]:
    """Thresholds that send (about) ``fractions[k]`` of the samples out at exit k.

    MSDNet's procedure: for k = 0..E-2, among the samples still in the network, θ_k is the
    confidence of the ⌊N·q_k⌋-th most confident one (samples tied with it leave too); θ_{E-1} = 0.
    Fit on validation data only.

    Args:
        probs: [E, N, K] per-exit probabilities of the fitting (validation) split.
        fractions: q_0..q_{E-1}, non-negative, summing to 1.
        combine: confidence from each exit's own probabilities (``"last"``, MSDNet) or from the
            anytime ensemble of exits 0..k (``"mean_probs"``).

    Returns:
        E thresholds (floats; :data:`NEVER` where no sample should leave).
    """
    p, _ = _check_probs(probs)
    E, N = p.shape[0], p.shape[1]
    q = np.asarray(fractions, dtype=np.float64)
    if q.shape != (E,) or np.any(q < 0) or not math.isclose(float(q.sum()), 1.0, rel_tol=1e-6):
        raise ValueError(f"fractions must be {E} non-negative numbers summing to 1, got {q.tolist()}")
    conf, _ = _confidences(p, combine)
    remaining = np.ones(N, dtype=bool)
    thresholds: list[float] = []
    for k in range(E - 1):
        want = int(math.floor(N * q[k] + 1e-9))
        left = np.sort(conf[k][remaining])[::-1]
        if want <= 0 or left.size == 0:
            th = NEVER
        else:
            # more wanted than remain: all remaining leave (MSDNet would let none leave here)
            th = float(left[min(want, left.size) - 1])
        thresholds.append(th)
        remaining &= ~(conf[k] >= th)
    thresholds.append(0.0)
    return thresholds


def evaluate_thresholds(probs: Any, labels: Any, thresholds: Sequence[float], costs: Sequence[float],
                        combine: str = "last") -> dict[str, Any]:
    """Score confidence thresholds on a split: each sample leaves at the first exit k with
    confidence >= θ_k and is charged ``costs[k]`` (the cumulative cost of reaching exit k).

    Returns:
        ``accuracy``, ``mean_cost``, ``exit_fractions`` (share of samples leaving at each exit),
        ``n``.
    """
    p, y = _check_probs(probs, labels)
    E, N = p.shape[0], p.shape[1]
    th = np.asarray(thresholds, dtype=np.float64)
    if th.shape != (E,):
        raise ValueError(f"need {E} thresholds, got {th.shape}")
    if not np.isfinite(th).all():  # a NaN threshold is never reached: every sample would run to the end
        raise ValueError(f"thresholds must be finite numbers, got {th.tolist()}")
    c = _check_costs(costs, E)
    conf, pred = _confidences(p, combine)
    passes = conf >= th[:, None]
    passes[-1] = True  # the last exit takes whoever is left
    exit_at = passes.argmax(0)
    correct = pred[exit_at, np.arange(N)] == y
    counts = np.bincount(exit_at, minlength=E)
    return {"accuracy": float(correct.mean()), "mean_cost": float(c[exit_at].mean()),
            "exit_fractions": [float(v) for v in counts / N], "n": int(N)}


_DEFAULT_RATIOS = tuple(k / 20 for k in range(1, 41))  # MSDNet's dynamic-evaluation grid


def fit_thresholds_for_cost(probs: Any, labels: Any, costs: Sequence[float], target_cost: float,
                            combine: str = "last", ratios: Sequence[float] | None = None) -> tuple[list[float], dict[str, Any]]:
    """Thresholds with the best validation accuracy whose validation mean cost is within
    ``target_cost``, searched over MSDNet's geometric exit distributions (and the two extremes:
    everyone at the first exit, everyone at the last).

    Args:
        probs, labels: the VALIDATION split.
        costs: cumulative cost of each exit.
        target_cost: the average cost per sample to stay within.
        combine: see :func:`fit_thresholds`.
        ratios: geometric ratios to try; default a log grid from 1/100 to 100 plus MSDNet's
            0.05..2.0.

    Returns:
        (thresholds, validation result of :func:`evaluate_thresholds` plus ``ratio``).

    Raises:
        ValueError: the target is below the cost of the first exit.
    """
    p, y = _check_probs(probs, labels)
    E = p.shape[0]
    c = _check_costs(costs, E)
    if not math.isfinite(target_cost):  # NaN would pass every comparison below and accept any thresholds
        raise ValueError(f"target cost must be a finite number, got {target_cost!r}")
    if target_cost < c[0]:
        raise ValueError(f"target cost {target_cost:g} is below the cost of the first exit ({c[0]:g}); "
                         f"no thresholds can meet it")
    grid = list(ratios) if ratios is not None else sorted(set(np.geomspace(0.01, 100, 81).tolist()) | set(_DEFAULT_RATIOS))
    candidates: list[tuple[Any, np.ndarray]] = [(r, geometric_fractions(E, r)) for r in grid]
    candidates += [("first", np.eye(E)[0]), ("last", np.eye(E)[-1])]
    best: tuple[list[float], dict[str, Any]] | None = None
    for r, q in candidates:
        th = fit_thresholds(p, q, combine)
        res = evaluate_thresholds(p, y, th, c, combine)
        if res["mean_cost"] > target_cost * (1 + 1e-12):
            continue
        res["ratio"] = r
        if best is None or (res["accuracy"], -res["mean_cost"]) > (best[1]["accuracy"], -best[1]["mean_cost"]):
            best = (th, res)
    assert best is not None  # "first" always fits once target >= costs[0]
    return best


def threshold_curve(val_probs: Any, val_labels: Any, test_probs: Any, test_labels: Any, costs: Sequence[float],
                    combine: str = "last", ratios: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """MSDNet's budgeted-batch curve: for each geometric ratio, thresholds fitted on the
    validation split and scored on the test split.

    Returns:
        one dict per ratio: ``ratio``, ``thresholds``, ``val_accuracy``, ``val_cost``,
        ``accuracy`` (test), ``mean_cost`` (test), ``exit_fractions`` (test).
    """
    vp, vy = _check_probs(val_probs, val_labels)
    tp, ty = _check_probs(test_probs, test_labels)
    if vp.shape[0] != tp.shape[0]:
        raise ValueError(f"validation has {vp.shape[0]} exits, test {tp.shape[0]}")
    out = []
    for r in (ratios if ratios is not None else _DEFAULT_RATIOS):
        th = fit_thresholds(vp, geometric_fractions(vp.shape[0], r), combine)
        v = evaluate_thresholds(vp, vy, th, costs, combine)
        t = evaluate_thresholds(tp, ty, th, costs, combine)
        out.append({"ratio": float(r), "thresholds": th, "val_accuracy": v["accuracy"], "val_cost": v["mean_cost"],
                    "accuracy": t["accuracy"], "mean_cost": t["mean_cost"], "exit_fractions": t["exit_fractions"]})
    return out
