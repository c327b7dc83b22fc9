"""Accuracy of the combined prediction after each stage, accumulated over batches (numpy).

The combined prediction after stage k under a rule is :func:`kdedge.bundle.manifest.combine`
of stages 0..k, exactly as :func:`kdedge.train.evaluate.anytime_accuracies` computes it in
torch; a fused prefix's prediction is the argmax of its logits.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from kdedge.bundle.combine import combine
from kdedge.export.ortrun import OrtChain


class AccuracyMeter:
    """Counts correct combined predictions per stage and rule.

    Example:
        >>> m = AccuracyMeter([1, 2], ["mean_logits"]); m.update([l0, l1], y); m.result()
        [{'mean_logits': 0.9}, {'mean_logits': 0.95}]
    """

    def __init__(self, members: Sequence[int], rules: Sequence[str]) -> None:
        self.members = list(members)
        self.rules = list(rules)
        self.correct = np.zeros((len(self.members), len(self.rules)), dtype=np.int64)
        self.n = 0

    def predictions(self, logits: Sequence[np.ndarray]) -> np.ndarray:
        """Argmax of the combined prediction, shape [stages, rules, batch]."""
        return np.stack([
            np.stack([combine(r, logits[: k + 1], self.members[: k + 1]).argmax(-1) for r in self.rules])
            for k in range(len(logits))
        ])

    def update(self, logits: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray:
        """Add one batch; returns its predictions (see :meth:`predictions`)."""
        pred = self.predictions(logits)
        self.correct[: len(logits)] += (pred == y[None, None, :]).sum(-1)
        self.n += len(y)
        return pred

    def result(self) -> list[dict[str, float]]:
        if self.n == 0:
            raise ValueError("no labelled samples were evaluated")
        return [{r: float(self.correct[k, j] / self.n) for j, r in enumerate(self.rules)} for k in range(len(self.members))]


def chain_accuracy(stages: OrtChain, batches: Iterable[tuple[np.ndarray, np.ndarray]], rules: Sequence[str],
                   prefixes: OrtChain | None = None) -> tuple[list[dict[str, float]], list[float], int]:
    """Accuracy after each stage (per rule) and of each fused prefix, over ``batches``.

    Returns:
        (per stage ``{rule: accuracy}``, per prefix accuracy, number of samples).
    """
    meter = AccuracyMeter([g.members for g in stages.graphs], rules)
    pcorrect = np.zeros(len(prefixes.graphs) if prefixes else 0, dtype=np.int64)
    for x, y in batches:
        meter.update(stages.logits(stages.run(x)), y)
        if prefixes is not None:
            for k, lg in enumerate(prefixes.logits(prefixes.run_each(x))):
                pcorrect[k] += int((lg.argmax(-1) == y).sum())
    acc = meter.result()
    return acc, [float(c / meter.n) for c in pcorrect], meter.n
