"""Combine rules in numpy: completed stages' logits to class probabilities, incrementally.

The formulas are those of ``kdedge.models.stages.combine_torch`` (and ``docs/bundle.md``);
``logits_j`` is stage j's logits output, the SUM of the logits of its ``members_j`` members:

- ``mean_logits`` (HNE): softmax(Σ_j logits_j / Σ_j members_j)
- ``mean_probs`` (multi-exit, anytime mode): mean_j softmax(logits_j / members_j)
- ``last`` (multi-exit budget mode, a one-stage student): softmax(logits_k / members_k)

:class:`Running` keeps the state the next stage needs (a running sum of logits, or of
probabilities), so the runner adds a stage in O(batch × classes) without keeping every
stage's logits; samples that leave the batch (confidence policy) are dropped with
:meth:`Running.keep`. Arithmetic is float64, like ``kdedge.bundle.manifest.combine``.

Example:
    >>> run = Running("mean_logits")
    >>> run.add(logits0, members=1)
    >>> run.add(logits1, members=2)
    >>> run.probs()        # softmax((logits0 + logits1) / 3)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

COMBINE_RULES = ("mean_logits", "mean_probs", "last")

__all__ = ["COMBINE_RULES", "Running", "check_rule", "combine", "softmax"]


def check_rule(rule: str) -> str:
    """Return ``rule`` if it is a known combine rule, else raise ValueError naming the known ones."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {rule!r}; known: {', '.join(COMBINE_RULES)}")
    return rule


def softmax(z: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``z * scale`` over the last axis, in float64 (a new array).

    The row maximum is subtracted before ``exp``, so finite logits give finite probabilities
    however large they are (float32 logits near 3e38 included: the arithmetic is float64). Logits
    holding NaN or infinity have no meaningful softmax; callers refuse them first (the runner
    checks each stage's logits, :func:`combine` checks its arguments).

    Written with few numpy calls: on [1, classes] arrays the per-call cost, not the arithmetic,
    is what the runner pays.
    """
    z = np.multiply(z, scale, dtype=np.float64)  # a new array: the caller's buffer may be reused
    z -= z.max(axis=-1)[..., None]
    np.exp(z, out=z)
    z /= z.sum(axis=-1)[..., None]
    return z


class Running:
    """The running combination of the stages completed so far, for one batch.

    Args:
        rule: a combine rule (``mean_logits``, ``mean_probs``, ``last``).

    Not thread-safe: one instance belongs to one call of the runner.
    """

    __slots__ = ("rule", "members", "stages", "_acc")

    def __init__(self, rule: str) -> None:
        self.rule = check_rule(rule)
        self.members = 0          # members averaged so far
        self.stages = 0           # stages added so far
        self._acc: np.ndarray | None = None

    def add(self, logits: np.ndarray, members: int) -> None:
        """Add a completed stage: its logits [N, K] (sum over ``members`` members), finite (the
        runner checks them; the check is not repeated here, on the hot path)."""
        if members < 1:
            raise ValueError(f"a stage completes at least one member, got members={members}")
        if self.rule == "mean_logits":
            if self._acc is None:
                self._acc = np.array(logits, dtype=np.float64)
            else:
                self._acc += logits
        elif self.rule == "mean_probs":
            p = softmax(logits, 1.0 / members)
            if self._acc is None:
                self._acc = p
            else:
                self._acc += p
        else:  # last
            self._acc = np.multiply(logits, 1.0 / members, dtype=np.float64)
        self.members += members
        self.stages += 1

    def set_fused(self, logits: np.ndarray, members: int, stages: int) -> None:
        """Start from a fused prefix graph: the summed logits of ``members`` members over ``stages`` stages.

        A fused prefix computes the mean of its members' logits (``mean_logits``), whatever the
        rule; this is how budget mode uses it.
        """
        self._acc = np.array(logits, dtype=np.float64)
        self.members = members
        self.stages = stages
        self.rule = "mean_logits"

    def probs(self) -> np.ndarray:
        """Class probabilities [N, K] (float64, a new array) after the stages added."""
        if self._acc is None:
            raise ValueError("no stage has completed yet")
        if self.rule == "mean_logits":
            return softmax(self._acc, 1.0 / self.members)
        if self.rule == "mean_probs":
            return self._acc / self.stages
        return softmax(self._acc)

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the samples where ``mask`` is True (samples that leave the batch)."""
        if self._acc is not None:
            self._acc = self._acc[mask]


def combine(rule: str, logits: Sequence[np.ndarray], members: Sequence[int]) -> np.ndarray:
    """Class probabilities after the completed stages ``0..k`` (``len(logits) == k + 1``).

    Same semantics as ``kdedge.models.stages.combine_torch``.

    Raises:
        ValueError: no stage, mismatched lengths, an unknown rule, or logits holding NaN or
            infinity (their probabilities would be NaN: refused, not returned).

    Example:
        >>> combine("mean_logits", [np.zeros((1, 3)), np.ones((1, 3))], [1, 2]).shape
        (1, 3)
    """
    if not len(logits):
        raise ValueError("combine needs at least one completed stage")
    if len(logits) != len(members):
        raise ValueError(f"combine: {len(logits)} logits arrays for {len(members)} member counts")
    run = Running(rule)
    for j, (lg, m) in enumerate(zip(logits, members)):
        if not np.isfinite(np.asarray(lg, dtype=np.float64)).all():
            raise ValueError(f"combine: the logits of stage {j} hold NaN or infinite values")
        run.add(lg, int(m))
    return run.probs()
