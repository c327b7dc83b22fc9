"""A request's life in the scheduler: its :class:`Ticket` while queued and running, the
:class:`Answer` it gets, and the statuses an answer can have."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Answer", "CLOSED", "FAILED", "OK", "QUEUE_FULL", "RANKED", "SHED", "STATUSES", "Ticket", "rank"]

OK = "ok"                  # answered (``budget_met`` says whether in time)
SHED = "shed"              # refused at once: even stage 0 cannot end before the deadline
QUEUE_FULL = "queue_full"  # refused at once: the queue holds max_queue requests
CLOSED = "closed"          # refused: the scheduler is closing (or closed)
FAILED = "error"           # accepted, but no answer can be given (the model computed NaN/inf for it)
STATUSES = (OK, SHED, QUEUE_FULL, CLOSED, FAILED)
RANKED = 5  # classes an answer carries ranked (the server's default top-k); more are ranked on demand
_FULL_SORT = 128  # up to this many classes one stable sort per row is cheaper than a partition


def rank(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of every row of ``probs`` (batch, classes), most probable
    first, equal probabilities by label: ``(labels, p)``, each (batch, k). Up to 128 classes a
    full stable sort (fastest there); beyond, a partition first (a 32 x 1000 batch: 0.5 ms
    instead of 2), where which of several classes tied at the k-th place is kept is numpy's."""
    n = probs.shape[1]
    k = max(1, min(int(k), n))
    if n <= _FULL_SORT or k == n:
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    else:
        top = np.sort(np.argpartition(-probs, k - 1, axis=1)[:, :k], axis=1)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(probs, top, axis=1), axis=1, kind="stable"),
                                 axis=1)
    return top, np.take_along_axis(probs, top, axis=1)


def rank_row(values: Sequence[float], k: int) -> list[int]:
    """:func:`rank`'s order for one row given as Python floats (most probable first, equal
    probabilities by label), in plain Python."""
    return sorted(range(len(values)), key=lambda j: -values[j])[:max(1, min(int(k), len(values)))]


def rank_lists(probs: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """:func:`rank` as Python lists. One row of up to :data:`_FULL_SORT` classes is ranked in
    plain Python: one ``tolist`` and a sort cost less than numpy's several calls, each of which
    runs cold right after a model's run (the worker answering a batch of one)."""
    if len(probs) == 1 and probs.shape[1] <= _FULL_SORT:
        row = probs[0].tolist()
        best = rank_row(row, k)
        return [best], [[row[j] for j in best]]
    top, vals = rank(probs, k)
    return top.tolist(), vals.tolist()


@dataclass(slots=True)
class Answer:
    """What a request got.

    Attributes:
        id: the request's number (in submission order).
        status: :data:`OK`, :data:`SHED`, :data:`QUEUE_FULL`, :data:`CLOSED` or :data:`FAILED`.
        message: why, for every status but ``ok``.
        probs: class probabilities [classes] (float64), or None.
        label: predicted class index (-1 without an answer).
        class_name: its name.
        confidence: the predicted class's probability.
        stage: the last stage the answer includes (-1 without an answer).
        members: ensemble members it averages.
        batch: samples in the micro-batch it ran in (at stage 0).
        queue_ms: arrival to the start of its micro-batch.
        compute_ms: start of its micro-batch to its answer.
        total_ms: arrival to its answer.
        deadline_ms: its deadline, from arrival (None: none).
        budget_met: answered within the deadline.
        ranked: the :data:`RANKED` most probable classes as ``(label, p)``, most probable first
            (ranked when the answer was made; empty without an answer).
    """

    id: int
    status: str
    message: str = ""
    probs: np.ndarray | None = None
    label: int = -1
    class_name: str = ""
    confidence: float = 0.0
    stage: int = -1
    members: int = 0
    batch: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    deadline_ms: float | None = None
    budget_met: bool = False
    ranked: tuple[tuple[int, float], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == OK

    def top_k(self, k: int, classes: Sequence[str]) -> list[dict[str, Any]]:
        """The ``k`` most probable classes, most probable first: ``{"label", "class", "p"}``."""
        if self.probs is None:
            return []
        k = max(1, min(int(k), len(self.probs)))
        if k <= len(self.ranked):
            return [{"label": i, "class": classes[i], "p": p} for i, p in self.ranked[:k]]
        idx, p = rank(np.asarray(self.probs)[None], k)
        return [{"label": i, "class": classes[i], "p": v} for i, v in zip(idx[0].tolist(), p[0].tolist())]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.status == OK:
            d.update(label=self.label, **{"class": self.class_name}, confidence=self.confidence, stage=self.stage,
                     members=self.members, batch=self.batch)
        else:
            d["error"] = self.message
        d.update(queue_ms=self.queue_ms, compute_ms=self.compute_ms, total_ms=self.total_ms,
                 deadline_ms=self.deadline_ms, budget_met=self.budget_met)
        return d


class Ticket:
    """One submitted request: its sample, times, and (once done) its :class:`Answer`.

    ``result(timeout)`` waits for the answer; a ``callback`` given to :meth:`Scheduler.submit`
    is called once with it, from the thread that answers (the worker, or the submitting thread
    for a refusal): keep it short and non-blocking (e.g. ``loop.call_soon_threadsafe``).
    """

    __slots__ = ("id", "x", "arrival", "deadline", "deadline_ms", "_answer", "_event", "_callback")

    def __init__(self, id: int, x: np.ndarray | None, arrival: float, deadline_ms: float | None,
                 callback: Callable[[Answer], None] | None) -> None:
        self.id = id
        self.x = x
        self.arrival = arrival
        self.deadline_ms = deadline_ms
        self.deadline = math.inf if deadline_ms is None else arrival + deadline_ms / 1e3
        self._answer: Answer | None = None
        self._event: threading.Event | None = None if callback is not None else threading.Event()
        self._callback = callback

    def done(self) -> bool:
        return self._answer is not None

    def result(self, timeout: float | None = None) -> Answer:
        """The answer, waiting at most ``timeout`` seconds.

        Raises:
            TimeoutError: not answered in time (the request stays queued).
        """
        if self._answer is None:
            if self._event is None:
                raise RuntimeError("this ticket reports through its callback; it cannot be waited on")
            if not self._event.wait(timeout):
                raise TimeoutError(f"request {self.id} was not answered within {timeout} s")
        assert self._answer is not None
        return self._answer

    def _finish(self, answer: Answer) -> bool:
        if self._answer is not None:  # answered already: a second answer is a bug, never sent
            return False
        self._answer = answer
        self.x = None  # the sample is not needed any more; the queue may hold many tickets
        if self._callback is not None:
            self._callback(answer)
        else:
            assert self._event is not None
            self._event.set()
        return True
