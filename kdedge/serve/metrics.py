"""Prometheus metrics of one server, in its own registry (several servers in one process, as in
the tests, do not share counters).

Names (all prefixed ``kdedge_``): ``requests_total{status}`` (ok, shed, queue_full, closed,
starting, error, bad_request), ``answers_total{stage}``, ``deadline_misses_total`` (answered
after the deadline), ``shed_total``, ``queue_length``, ``in_flight``, ``load_factor``, and the
histograms ``request_seconds`` (arrival to answer), ``queue_seconds``, ``compute_seconds`` and
``batch_size``; and the process's garbage collector: ``gc_pause_seconds{generation}`` (each
collection's duration, while the app runs: every request in flight waits for it) and
``gc_frozen_objects`` (objects in the permanent generation, ``kdedge serve --gc-freeze``).
"""

from __future__ import annotations

import bisect
import gc
import time
from typing import Any, Iterator

__all__ = ["GC_BUCKETS", "GcPauses", "Metrics"]

GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # seconds


class GcPauses:
    """How long each collection of Python's cyclic garbage collector takes, per generation:
    a Prometheus collector (``kdedge_gc_pause_seconds``) fed by ``gc.callbacks``.

    The callback runs inside the collection, in whichever thread triggered it, so it only
    updates plain counters (no locks: a prometheus_client metric's lock taken there could be
    the one its thread already holds); the histogram is built from them when scraped.
    ``install()`` / ``remove()`` bracket the time it counts.
    """

    def __init__(self) -> None:
        self._counts = [[0] * (len(GC_BUCKETS) + 1) for _ in range(3)]  # per generation, last: +Inf
        self._sums = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        d = time.perf_counter() - self._t0
        g = min(max(int(info.get("generation", 2)), 0), 2)
        self._counts[g][bisect.bisect_left(GC_BUCKETS, d)] += 1  # the first bucket with d <= its bound
        self._sums[g] += d

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        h = HistogramMetricFamily("kdedge_gc_pause_seconds", "Duration of each garbage collection, by generation.",
                                  labels=["generation"])
        for g in range(3):
            counts, total, buckets = list(self._counts[g]), self._sums[g], []
            acc = 0
            for le, c in zip([*(f"{b:g}" for b in GC_BUCKETS), "+Inf"], counts):
                acc += c
                buckets.append((le, acc))
            h.add_metric([str(g)], buckets, total)
        yield h

_STATUSES = ("ok", "shed", "queue_full", "closed", "starting", "error", "bad_request", "overloaded", "disconnected")
# seconds: from well under a millisecond (small models) to a second (a deadline far too long)
_TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class Metrics:
    """The server's counters, gauges and histograms.

    Args:
        scheduler: the :class:`~kdedge.runtime.scheduler.Scheduler` whose queue the gauges read.
        num_stages: the bundle's stage count (one ``answers_total`` series per stage).
        max_batch: the largest micro-batch (the ``batch_size`` buckets).
    """

    def __init__(self, scheduler: Any, num_stages: int, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("kdedge_requests", "Requests by outcome.", ["status"], registry=r)
        self.answers = Counter("kdedge_answers", "Answers by the last stage they include.", ["stage"], registry=r)
        self.misses = Counter("kdedge_deadline_misses", "Answers given after their deadline.", registry=r)
        self.shed = Counter("kdedge_shed", "Requests refused at once because even stage 0 could not end before "
                                           "their deadline.", registry=r)
        Gauge("kdedge_queue_length", "Requests waiting.", registry=r).set_function(lambda: scheduler.queue_length)
        Gauge("kdedge_in_flight", "Requests accepted and not yet answered.",
              registry=r).set_function(lambda: scheduler.in_flight)
        Gauge("kdedge_load_factor", "How much slower than profiled the last stages ran (1: as profiled).",
              registry=r).set_function(lambda: scheduler.stats()["load_factor"])
        self.total = Histogram("kdedge_request_seconds", "Arrival to answer.", buckets=_TIME_BUCKETS, registry=r)
        self.queue = Histogram("kdedge_queue_seconds", "Arrival to the start of the micro-batch.",
                               buckets=_TIME_BUCKETS, registry=r)
        self.compute = Histogram("kdedge_compute_seconds", "Start of the micro-batch to the answer.",
                                 buckets=_TIME_BUCKETS, registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch = Histogram("kdedge_batch_size", "Samples in the micro-batch of each answer.",
                               buckets=[b for b in sizes if b <= max_batch], registry=r)
        Gauge("kdedge_gc_frozen_objects", "Objects in the garbage collector's permanent generation.",
              registry=r).set_function(gc.get_freeze_count)
        self.gc = GcPauses()
        r.register(self.gc)
        self._status = {s: self.requests.labels(status=s) for s in _STATUSES}
        self._stage = [self.answers.labels(stage=str(k)) for k in range(num_stages)]

    def count(self, status: str) -> None:
        """One request that ended with ``status`` (an answer's, or ``bad_request``, ``starting``)."""
        c = self._status.get(status)
        if c is None:
            c = self._status[status] = self.requests.labels(status=status)
        c.inc()
        if status == "shed":
            self.shed.inc()

    def answered(self, answer: Any) -> None:
        """Record an :class:`~kdedge.runtime.scheduler.Answer` (any status)."""
        self.count(answer.status)
        if answer.status != "ok":
            return
        if 0 <= answer.stage < len(self._stage):
            self._stage[answer.stage].inc()
        if not answer.budget_met:
            self.misses.inc()
        self.total.observe(answer.total_ms / 1e3)
        self.queue.observe(answer.queue_ms / 1e3)
        self.compute.observe(answer.compute_ms / 1e3)
        self.batch.observe(answer.batch)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition format, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
