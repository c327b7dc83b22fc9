"""What a runner call returns: one :class:`Result` per sample (:class:`Results` for the batch), and
:class:`OutputError` for logits a stage should never produce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

__all__ = ["OutputError", "Result", "Results"]


class OutputError(ValueError):
    """A stage produced NaN or infinite logits, so no answer can be given (never a NaN one).

    A bundle's graphs compute finite logits for inputs in the range they were trained on; an
    overflow means the input is far outside it (e.g. a float32 ``.npy`` of unnormalised values).

    Attributes:
        sample: the index, in the request, of the first sample whose logits are not finite.
    """

    def __init__(self, message: str, sample: int = 0) -> None:
        super().__init__(message)
        self.sample = sample


def _finite(a: Any) -> bool:
    """All of ``a`` (a stage's [N, classes] logits) is finite. ``isfinite().all()`` rather than a
    sum: a sum of +inf and -inf would print numpy's RuntimeWarning beside the error."""
    return bool(np.isfinite(a).all())


def _logits_error(graph: str, tensor: str, logits: Any, x: np.ndarray, classes: int,
                  idx: np.ndarray | None = None) -> ValueError:
    """The error for logits of the wrong shape (a session that does not match the manifest), or
    for non-finite logits of the active samples ``x`` (``idx``: their indices in the request;
    None: all of it), naming the graph, the tensor and the first bad sample."""
    if tuple(logits.shape) != (len(x), classes):
        return ValueError(f"{graph} returned logits {tensor} of shape {list(logits.shape)} for {len(x)} sample(s), "
                          f"the manifest says [N, {classes}]; its file does not match the manifest, re-export "
                          "the bundle")
    a = np.asarray(logits, dtype=np.float64).reshape(len(x), -1)
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    first = int(bad[0] if idx is None else idx[bad[0]]) if bad.size else 0
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return OutputError(f"{graph} computed NaN or infinite logits ({tensor}) for {bad.size} of {len(x)} sample(s), "
                       f"the first is sample {first} of the request: the computation overflowed; the input's values "
                       f"reach {peak:.3g}, while preprocessed images stay within a few units; check that the input "
                       "is preprocessed by the bundle's rule (or pass raw uint8 images)", sample=first)


@dataclass(frozen=True)
class Result:
    """The answer for one sample.

    Attributes:
        probs: class probabilities [classes] (float64).
        label: predicted class index.
        class_name: its name from the manifest.
        confidence: the predicted class's probability.
        stage: the last stage whose output the answer includes (a fused prefix counts as its
            last stage).
        members: ensemble members the answer averages.
        stage_ms: time of each stage this sample went through (the batch's, in order).
        total_ms: time from the request's start to this sample's answer.
        budget_met: ``total_ms`` within the policy's budget (True when it has none).
    """

    probs: np.ndarray
    label: int
    class_name: str
    confidence: float
    stage: int
    members: int
    stage_ms: tuple[float, ...]
    total_ms: float
    budget_met: bool

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "class": self.class_name, "confidence": self.confidence, "stage": self.stage,
                "members": self.members, "stage_ms": list(self.stage_ms), "total_ms": self.total_ms,
                "budget_met": self.budget_met}


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs microseconds per call
class Results:
    """The answers for a batch, as arrays; ``results[i]`` is sample i's :class:`Result`.

    Attributes:
        probs: [N, classes] float64.
        stage: [N] last stage included in each answer.
        members: [N] members averaged.
        total_ms: [N] time to each sample's answer.
        budget_met: [N] bool.
        graphs: the graphs run in this call, in order (``stage0``, ``stage1``… or ``prefix2``).
        stage_ms: the time of each of them (an aborted stage included).
        aborted: the graph the watchdog aborted, or None.
        policy: the policy's name.
        budget_ms: the policy's budget, or None.
        classes: class names.
    """

    probs: np.ndarray
    stage: np.ndarray
    members: np.ndarray
    total_ms: np.ndarray
    budget_met: np.ndarray
    graphs: tuple[str, ...]
    stage_ms: tuple[float, ...]
    aborted: str | None
    policy: str
    budget_ms: float | None
    classes: tuple[str, ...]

    @property
    def labels(self) -> np.ndarray:
        """[N] predicted class indices."""
        return self.probs.argmax(axis=1)

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def __getitem__(self, i: int) -> Result:
        p = self.probs[i]
        label = int(p.argmax())
        stage = int(self.stage[i])
        fused = bool(self.graphs) and self.graphs[0].startswith("prefix")
        times = self.stage_ms[:1] if fused else self.stage_ms[: stage + 1]
        return Result(probs=p, label=label, class_name=self.classes[label], confidence=float(p[label]),
                      stage=stage, members=int(self.members[i]), stage_ms=tuple(times),
                      total_ms=float(self.total_ms[i]), budget_met=bool(self.budget_met[i]))

    def __iter__(self) -> Iterator[Result]:
        return (self[i] for i in range(len(self)))

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "budget_ms": self.budget_ms, "graphs": list(self.graphs),
                "stage_ms": list(self.stage_ms), "aborted": self.aborted, "results": [r.to_dict() for r in self]}
