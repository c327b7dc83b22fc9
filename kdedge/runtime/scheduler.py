"""Serving under varying load: a bounded request queue, micro-batches, and a depth per sample.

A :class:`Scheduler` sits between many callers (an HTTP server's handlers) and one
:class:`~kdedge.runtime.Runner`. Each request is one sample with an arrival time and a deadline.
A worker takes what is queued, earliest deadline first, up to ``max_batch`` samples at once
(per-sample cost at batch 8-32 is far below batch 1), and runs the micro-batch stage by stage;
before each stage it decides, per sample, whether that sample goes on, and a sample that stops
is answered at once, while the others continue (the runner's per-sample masks). What it plans
with:

- the latency of each stage at the active batch size, from the runner's latency profile
  (interpolated linearly between the measured batch sizes: ``kdedge profile --batch 1,8,32``),
  scaled by an online load factor: a high ratio of measured to planned stage time over the last
  ``online`` stages (the rule of :mod:`kdedge.runtime.online`, robust to a lone preemption), so
  a device that gets busy plans shallower before it misses;
- the sample's own deadline: stage k runs only if it ends ``margin_ms`` before it;
- the backlog: stage k runs only if every queued request can still be answered in time after
  it, at the depth the queue could reach had the batch stopped, up to depth k (a batch does not
  go deeper than it leaves the queue, unless the queue could not go deeper anyway). Under
  overload this degrades everyone's depth evenly, down to stage 0, before any deadline is missed;
- what may still arrive: no stage runs longer than the default deadline less stage 0 of a full
  batch and the margin, so a request arriving as it starts can still be answered in time.

Admission: a request is refused at once (status ``shed``) when, queued behind what is there,
even its stage 0 (at the batch size it will run in) cannot end before its deadline, or when
admitting it would make a request already accepted miss its stage 0; when the queue holds
``max_queue`` requests (``queue_full``, back-pressure); and once the scheduler is closing
(``closed``). Nothing accepted is dropped: every accepted request is answered, at least with
stage 0 (late, marked ``budget_met=False``, only when the device ran slower than planned).
:meth:`Scheduler.close` answers (``drain=True``) or refuses (``closed``) every queued request
before it returns.

With ``stages=K`` the scheduler is a plain serving stack: every request runs exactly the first
K stages (through the fused prefix graph when the bundle has one), with the same queue,
batching and admission; it is the baseline the anytime depth is measured against.

Deterministic tests: pass the runner's ``clock`` and ``start=False``, then drive
:meth:`Scheduler.step` by hand (fake sessions advance the fake clock).

Example:
    >>> runner = Runner("hne.kdedge", threads=1)       # with a profile of batches 1,8,32
    >>> with Scheduler(runner, deadline_ms=20, max_batch=32) as sched:
    ...     ticket = sched.submit(x[None])                # one preprocessed sample [1, C, H, W]
    ...     answer = ticket.result(timeout=1.0)
    ...     answer.status, answer.class_name, answer.stage, answer.total_ms, answer.budget_met
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from kdedge.bundle.input_files import InputError, check_batch
from kdedge.bundle.profile.spec import ProfileError
from kdedge.runtime.costs import Costs
from kdedge.runtime.online import LoadEstimate
from kdedge.runtime.policies import CONTINUE, STOP, Decision, Fixed
from kdedge.runtime.realtime import GcGuard
from kdedge.runtime.results import OutputError
from kdedge.runtime.tickets import CLOSED, FAILED, OK, QUEUE_FULL, RANKED, SHED, STATUSES, Answer, Ticket, rank_lists

__all__ = ["Answer", "CLOSED", "Costs", "FAILED", "OK", "QUEUE_FULL", "SHED", "STATUSES", "Scheduler", "Ticket"]

MAX_DEADLINE_MS = 3_600_000.0  # an hour: beyond, a deadline is a unit mistake (seconds given as ms?)


def _positive(v: Any, what: str, integer: bool = False, upper: float = math.inf) -> Any:
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
    if integer:
        ok = ok and float(v) == int(v)
    if not ok or not 0 < v <= upper:
        kind = "an integer" if integer else "a number"
        bound = f" <= {upper:g}" if upper < math.inf else ""
        raise ValueError(f"{what} must be {kind} > 0{bound}, got {v!r}")
    return int(v) if integer else float(v)


LOAD_HORIZON_S = 1.0
"""The server forgets its load factor when no stage ran for this long: requests it shed because
of the factor run no stage, so only time can show that a burst is over."""


def _server_load(window: int, clock: Callable[[], float] = time.perf_counter) -> LoadEstimate:
    """The server's online load factor: :class:`~kdedge.runtime.online.LoadEstimate` taking the
    ``1 + window // 8``-th largest ratio (robust to a lone preempted stage; see its ``rank``),
    forgotten after :data:`LOAD_HORIZON_S` without a stage."""
    return LoadEstimate(window, rank=min(window, 1 + window // 8), horizon_s=LOAD_HORIZON_S, clock=clock)


# ---------------------------------------------------------------------------------------------
# the per-batch policies the runner calls


class _AnytimePolicy:
    """Before each stage of one micro-batch: which samples go on (see the module docstring).
    Samples that stop are answered here, at once; the runner's result answers the rest."""

    name = "anytime"
    budget_ms: float | None = None
    needs_profile = False

    def __init__(self, sched: Scheduler, batch: Sequence[Ticket], start: float) -> None:
        self.s = sched
        self.batch = batch
        self.start = start
        self.deadlines = np.fromiter((t.deadline for t in batch), float, len(batch))
        self.active = np.arange(len(batch))
        self.delivered = np.zeros(len(batch), bool)

    def decide(self, ctx: Any) -> Decision:
        s = self.s
        now = s._clock()
        k = ctx.stage
        if k == 0:
            s._busy_until = now + s._planned(0, ctx.batch) / 1e3
            return CONTINUE
        end = now + s._planned(k, ctx.batch) / 1e3
        limit = min(s._queue_limit(k, now), now + s._longest_stage())
        dl = self.deadlines[self.active]
        go = (dl - s.margin_s >= end) & (end <= limit)
        if go.all():
            s._busy_until = end
            return CONTINUE
        leave = ~go
        out = self.active[leave]
        s._answer_many([self.batch[j] for j in out], ctx.probs[leave], [k - 1] * len(out),
                       [ctx.members] * len(out), len(self.batch), self.start, now)
        self.delivered[out] = True
        if not go.any():
            return STOP
        self.active = self.active[go]
        s._busy_until = end
        return Decision(go)

    def observe(self, graph: str, ms: float, batch: int, num: int, cost: Any) -> None:
        self.s._observe(graph, ms, batch)


class _FixedPolicy:
    """Every sample runs the first K stages (:class:`~kdedge.runtime.Fixed`); the scheduler only
    learns when the batch should end."""

    budget_ms: float | None = None
    needs_profile = False

    def __init__(self, sched: Scheduler, inner: Fixed) -> None:
        self.s = sched
        self.inner = inner
        self.name = inner.name

    def decide(self, ctx: Any) -> Decision:
        if ctx.stage == 0:
            self.s._busy_until = self.s._clock() + self.s._min_cost(ctx.batch) / 1e3
        return self.inner.decide(ctx)

    def observe(self, graph: str, ms: float, batch: int, num: int, cost: Any) -> None:
        self.s._observe(graph, ms, batch)


# ---------------------------------------------------------------------------------------------
# the scheduler


class Scheduler:
    """A bounded queue of one-sample requests in front of a runner, answered by one worker in
    micro-batches, each sample as deep as its deadline and the backlog allow.

    Args:
        runner: a :class:`~kdedge.runtime.Runner` (or an object with its ``run(x, policy,
            start=)``, ``num_stages``, ``num_prefixes``, ``classes``, ``profile`` and
            ``warmup``). The scheduler does not close it.
        deadline_ms: the deadline of a request that brings none (None: no deadline; such a
            request runs every stage unless the backlog needs the time).
        max_batch: samples per micro-batch, at most.
        max_queue: requests waiting, at most; beyond, ``submit`` refuses (``queue_full``).
        stages: None (anytime: a depth per sample), or K: every request runs exactly the first
            K stages (a plain serving stack; the baseline).
        margin_ms: time kept free before a deadline for what follows the last stage (combining,
            answering, the HTTP response) and jitter.
        stat: the profile statistic that predicts a stage (p99, p95, median, ...).
        costs: planned costs instead of the runner's profile (tests, simulations); with
            ``stages=K`` and no profile, the queue admits requests by its bound only.
        online: the load factor's window in stages (0: plan with the profile alone).
        clock: the time source in seconds; must be the runner's (default ``time.perf_counter``,
            the runner's default).
        start: start the worker thread now (False: call :meth:`step` yourself).
        warmup: the worker warms the runner up (every batch size up to ``max_batch`` that is a
            power of two, and ``max_batch``) before it takes requests; :attr:`ready` says when.
        freeze_gc: after the warm-up, move every object of the process alive then into the
            permanent generation (``gc.freeze``), so that full collections while serving stay
            short; for a process that serves and does nothing else (``kdedge serve``). Off: as
            the runner's real-time settings say (``Realtime.freeze_gc``).

    Raises:
        ValueError: a bound or a deadline that is not a positive number, ``stages`` out of range.
        ProfileError: anytime serving without ``costs`` and without a usable latency profile.
    """

    def __init__(self, runner: Any, *, deadline_ms: float | None = None, max_batch: int = 32, max_queue: int = 1024,
                 stages: int | None = None, margin_ms: float = 0.5, stat: str = "p99", costs: Costs | None = None,
                 online: int = 32, clock: Callable[[], float] | None = None, start: bool = True,
                 warmup: bool = True, freeze_gc: bool = False) -> None:
        self.runner = runner
        self._freeze_gc = freeze_gc
        self.deadline_ms = None if deadline_ms is None else _positive(deadline_ms, "the deadline (ms)",
                                                                      upper=MAX_DEADLINE_MS)
        self.max_batch = _positive(max_batch, "max_batch", integer=True, upper=65_536)
        self.max_queue = _positive(max_queue, "max_queue", integer=True, upper=1_000_000)
        if not (isinstance(margin_ms, (int, float)) and not isinstance(margin_ms, bool) and math.isfinite(margin_ms)
                and margin_ms >= 0):
            raise ValueError(f"margin_ms must be a finite number >= 0, got {margin_ms!r}")
        self.margin_ms = float(margin_ms)
        self.margin_s = self.margin_ms / 1e3
        if isinstance(online, bool) or not isinstance(online, int) or not 0 <= online <= 1_000_000:
            raise ValueError(f"online must be a window of 0 … 1000000 stages, got {online!r}")
        self.num_stages = int(runner.num_stages)
        if stages is not None:
            if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= self.num_stages:
                raise ValueError(f"stages must be 1 … {self.num_stages} (the bundle's stages), got {stages!r}")
        self.stages = stages
        self.classes = tuple(runner.classes)
        self.profile_note: str | None = None  # with stages=K: why no profile plans admission
        self.input_shape = tuple(int(v) for v in runner.input_shape)
        self._fixed = Fixed(stages, fused=True) if stages is not None else None
        fused = stages is not None and stages - 1 < int(getattr(runner, "num_prefixes", 0))
        self._fixed_graphs = [f"prefix{stages - 1}"] if fused else [f"stage{k}" for k in range(stages or 0)]
        self._costs = costs if costs is not None else self._profile_costs(stat)
        self.clock: Callable[[], float] = clock or time.perf_counter
        self._clock = self.clock
        self._load = _server_load(online, self._clock) if online else None
        # cumulative stage costs per depth and batch size, before the load factor (seconds)
        self._cum: list[list[float]] | None = None
        if self._costs is not None and stages is None:
            self._cum = [[sum(self._costs(f"stage{j}", n) for j in range(d + 1)) / 1e3 if n else 0.0
                          for n in range(self.max_batch + 1)] for d in range(self.num_stages)]
        # the least a request needs at batch n (ms): stage 0, or the fixed depth; admission plans with it
        self._minc: list[float] | None = None
        if self._costs is not None:
            graphs = ["stage0"] if stages is None else self._fixed_graphs
            self._minc = [sum(self._costs(g, n) for g in graphs) if n else 0.0 for n in range(self.max_batch + 1)]

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._q: list[Ticket] = []       # EDF order (deadline, then arrival)
        self._dl: list[float] = []       # their deadlines, same order (bisect)
        self._ids = itertools.count()
        self._busy_until = -math.inf     # when the running micro-batch's current stage is planned to end
        self._running = 0
        self._closing = False
        self._drain = True
        self._ready = threading.Event()
        self._warmup = warmup
        self._failure: BaseException | None = None
        self._counts: dict[str, int] = {s: 0 for s in STATUSES}
        self._counts.update(misses=0, batches=0, batched=0)
        self._per_stage = [0] * self.num_stages
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="kdedge-scheduler", daemon=True)
            self._thread.start()
        elif not warmup:
            self._ready.set()

    # -- set-up --------------------------------------------------------------------------------
    def _profile_costs(self, stat: str) -> Costs | None:
        graphs = [f"stage{k}" for k in range(self.num_stages)]
        if self.stages is not None:
            graphs = list(dict.fromkeys([*graphs, *self._fixed_graphs]))
        try:
            profile = self.runner.profile
        except ProfileError as e:  # none, stale or foreign (the message says what to run)
            if self.stages is None:
                raise
            self.profile_note = str(e)
            return None  # a plain stack: admission by the queue's bound only
        return Costs.from_profile(profile, graphs, self.max_batch, stat=stat)

    def warm_sizes(self) -> list[int]:
        """The batch sizes warm-up runs: powers of two up to ``max_batch``, and ``max_batch``."""
        sizes = {1, self.max_batch}
        b = 2
        while b < self.max_batch:
            sizes.add(b)
            b *= 2
        return sorted(sizes)

    def warmup(self) -> None:
        """Run every batch size of :meth:`warm_sizes` through the runner (first-run allocations of
        each size cost milliseconds), then mark the scheduler ready."""
        self.runner.warmup(self.warm_sizes(), runs=2, prefixes=self.stages is not None)
        if self._freeze_gc:  # beyond what the runner's real-time settings froze in its warm-up
            GcGuard().freeze()
        self._ready.set()

    # -- facts ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Warmed up, taking requests, and not closing."""
        return self._ready.is_set() and not self._closing and self._failure is None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the worker (its warm-up failed), or None."""
        return self._failure

    @property
    def queue_length(self) -> int:
        return len(self._q)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered (queued or in the running micro-batch)."""
        return len(self._q) + self._running

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until warm-up is done; True when ready. Raises the warm-up's error if it failed."""
        self._ready.wait(timeout)
        if self._failure is not None:
            raise self._failure
        return self._ready.is_set()

    def stats(self) -> dict[str, Any]:
        """Counts since the start: requests by status, ``misses`` (answered after their
        deadline), ``per_stage`` (answers by their last stage), ``batches`` and ``mean_batch``,
        the current ``queue`` length and ``load_factor``."""
        with self._lock:
            c = dict(self._counts)
            per = list(self._per_stage)
        c["per_stage"] = per
        c["mean_batch"] = c["batched"] / c["batches"] if c["batches"] else 0.0
        c["queue"] = len(self._q)
        c["load_factor"] = self._load.factor() if self._load is not None else 1.0
        return c

    def describe(self) -> dict[str, Any]:
        """The configuration, for reports and ``GET /v1/model``."""
        return {"mode": "anytime" if self.stages is None else f"fixed-{self.stages}",
                "deadline_ms": self.deadline_ms, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "margin_ms": self.margin_ms, "online": self._load.window if self._load is not None else 0,
                "planned": self._costs is not None}

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, x: np.ndarray, deadline_ms: float | None = None, *, arrival: float | None = None,
               callback: Callable[[Answer], None] | None = None) -> Ticket:
        """Queue one preprocessed sample, or refuse it at once.

        Args:
            x: float32 [1, C, H, W] (or [C, H, W]), checked by the caller
                (:func:`~kdedge.runtime.check_batch`); the runner checks it again.
            deadline_ms: from ``arrival`` (default: the scheduler's).
            arrival: when the request arrived, on the scheduler's clock (default: now); its
                deadline counts from then, and so do ``queue_ms`` and ``total_ms``.
            callback: called once with the :class:`Answer` (else wait with ``ticket.result()``).

        Returns:
            a :class:`Ticket`, already answered when the request is refused (``shed``,
            ``queue_full``, ``closed``).

        Raises:
            InputError: ``x`` is not one finite float32 sample of the bundle's input shape.
            ValueError: a deadline that is not a positive number of milliseconds.
        """
        now = self._clock()
        if deadline_ms is None:
            deadline_ms = self.deadline_ms
        else:
            deadline_ms = _positive(deadline_ms, "the deadline (ms)", upper=MAX_DEADLINE_MS)
        if isinstance(x, np.ndarray) and x.ndim == 3:
            x = x[None]
        x = check_batch(x, self.input_shape, where="the request")
        if len(x) != 1:
            raise InputError(f"the request holds {len(x)} samples; a request is one sample (the scheduler batches "
                             "requests itself)")
        t = Ticket(next(self._ids), x, now if arrival is None else float(arrival), deadline_ms, callback)
        with self._cv:
            refused = self._refusal(t.deadline, now)
            if refused is None:
                p = bisect.bisect_right(self._dl, t.deadline)
                self._q.insert(p, t)
                self._dl.insert(p, t.deadline)
                self._cv.notify()
            else:
                self._counts[refused[0]] += 1
        if refused is not None:
            t._finish(Answer(t.id, refused[0], refused[1], total_ms=(self._clock() - t.arrival) * 1e3,
                             deadline_ms=deadline_ms))
        return t

    def precheck(self, deadline_ms: float | None = None, *, arrival: float | None = None) -> Answer | None:
        """Whether a request would be refused now, before its body is decoded: the refusal
        (counted, as :meth:`submit` would count it), or None (then decode and :meth:`submit`,
        which checks again). A server refuses what it must shed without spending time on it.

        Raises:
            ValueError: a deadline that is not a positive number of milliseconds.
        """
        now = self._clock()
        deadline_ms = self.deadline_ms if deadline_ms is None else _positive(deadline_ms, "the deadline (ms)",
                                                                               upper=MAX_DEADLINE_MS)
        arrival = now if arrival is None else float(arrival)
        deadline = math.inf if deadline_ms is None else arrival + deadline_ms / 1e3
        with self._lock:
            refused = self._refusal(deadline, now)
            if refused is not None:
                self._counts[refused[0]] += 1
        if refused is None:
            return None
        return Answer(-1, refused[0], refused[1], total_ms=(self._clock() - arrival) * 1e3, deadline_ms=deadline_ms)

    def _refusal(self, deadline: float, now: float) -> tuple[str, str] | None:
        """(status, why) when a request with this deadline is refused now (the lock is held)."""
        if self._closing or self._failure is not None:
            return (CLOSED, "the server is shutting down" if self._failure is None
                    else f"the server cannot run the model: {self._failure}")
        if len(self._q) >= self.max_queue:
            return (QUEUE_FULL, f"the queue is full ({self.max_queue} requests waiting); retry later")
        why = self._admit(bisect.bisect_right(self._dl, deadline), deadline, now)
        return None if why is None else (SHED, why)

    def _admit(self, p: int, deadline: float, now: float) -> str | None:
        """Why a request with ``deadline`` inserted at queue position ``p`` must be shed (None:
        admit). The queue is served in batches of ``max_batch`` in deadline order, each at the
        least depth (stage 0, or the fixed depth), after the running batch: shed when the new
        request's batch would end after its deadline, or when the earliest request of a later
        batch, in time without the new one, would not be with it."""
        if self._minc is None or deadline == math.inf:
            return None
        B = self.max_batch
        dl = self._dl
        n = len(dl)
        free = max(now, self._busy_until)
        f = self._factor() / 1e3
        minc = self._minc
        g0 = p // B
        new_n = n + 1
        for g in range(g0, (new_n + B - 1) // B):
            end = free + (g * minc[B] + minc[min(B, new_n - g * B)]) * f + self.margin_s
            if g == g0 and end > deadline:
                wait = max(0.0, (free - now) * 1e3)
                return (f"the deadline cannot be met: {n} request(s) queued ahead, the model busy for {wait:.2f} ms "
                        f"more; even stage 0 of this request would end {(end - deadline) * 1e3:.2f} ms after its "
                        f"deadline ({self.margin_ms:g} ms margin included); retry later or allow a longer deadline")
            first = g * B
            if first == p:
                continue
            j = first if first < p else first - 1  # its index without the new request
            if end > dl[j]:
                og = j // B
                before = free + (og * minc[B] + minc[min(B, n - og * B)]) * f + self.margin_s
                if before <= dl[j]:
                    return ("the deadline cannot be met without making an accepted request late (the queue is "
                            "full up to its deadlines); retry later or allow a longer deadline")
        return None

    # -- planning ------------------------------------------------------------------------------
    def _factor(self) -> float:
        return self._load.factor() if self._load is not None else 1.0

    def _planned(self, k: int, n: int) -> float:
        """Stage k at batch n, as planned now (ms)."""
        if self._costs is None:
            return 0.0
        return self._costs(f"stage{k}", n) * self._factor()

    def _min_cost(self, n: int) -> float:
        """The least a request needs at batch n, as planned now (ms): stage 0, or the fixed depth."""
        if self._minc is None:
            return 0.0
        return self._minc[min(n, self.max_batch)] * self._factor()

    def _latest_end(self, d: int, dl: Sequence[float], f: float) -> float:
        """The latest time the running batch may end so that every queued request, served in
        batches of ``max_batch`` in deadline order at depth ``d``, still ends in time."""
        assert self._cum is not None
        B = self.max_batch
        n = len(dl)
        cum_d = self._cum[d]
        full, rem = divmod(n, B)
        cB = cum_d[B] * f
        best = math.inf
        acc = 0.0
        for g in range(full):
            acc += cB
            v = dl[g * B] - acc
            if v < best:
                best = v
        if rem:
            acc += cum_d[rem] * f
            v = dl[full * B] - acc
            if v < best:
                best = v
        return best - self.margin_s

    def _longest_stage(self) -> float:
        """The longest a stage may run (seconds): a request that arrives as it starts, with the
        default deadline, must still get stage 0 of a full batch in time after it (infinite
        without a default deadline)."""
        if self.deadline_ms is None or self._minc is None:
            return math.inf
        return self.deadline_ms / 1e3 - self.margin_s - self._minc[self.max_batch] * self._factor() / 1e3

    def _queue_limit(self, k: int, now: float) -> float:
        """The latest time the running batch may end if it runs stage ``k``: the queue keeps the
        depth it could reach had the batch stopped now, up to depth k. ``now`` when the queue
        cannot even reach stage 0 any more (the batch stops)."""
        if self._cum is None:
            return math.inf
        with self._lock:
            dl = list(self._dl)
        if not dl:
            return math.inf
        f = self._factor()
        if self._latest_end(0, dl, f) < now:
            return now
        reach = 0
        for d in range(1, min(k, self.num_stages - 1) + 1):
            if self._latest_end(d, dl, f) < now:
                break
            reach = d
        return self._latest_end(min(k, reach), dl, f)

    def _observe(self, graph: str, ms: float, batch: int) -> None:
        if self._load is not None and self._costs is not None and graph in self._costs:
            self._load.observe(ms, self._costs(graph, batch))

    # -- running -------------------------------------------------------------------------------
    def step(self, timeout: float | None = 0.0) -> int:
        """Take up to ``max_batch`` queued requests (earliest deadline first) and answer them.

        Args:
            timeout: wait at most this long (seconds) for a request; None waits until one comes
                or the scheduler closes.

        Returns:
            the number of requests answered (0: none was queued).
        """
        batch = self._take(timeout)
        if not batch:
            return 0
        try:
            self._run_batch(batch)
        finally:
            with self._lock:
                self._running = 0
                self._busy_until = -math.inf
        return len(batch)

    def _take(self, timeout: float | None) -> list[Ticket]:
        with self._cv:
            if not self._q and not self._closing and timeout != 0.0:
                self._cv.wait_for(lambda: self._q or self._closing, timeout)
            batch = self._q[: self.max_batch]
            del self._q[: self.max_batch]
            del self._dl[: self.max_batch]
            self._running = len(batch)
            if batch:  # until its first stage is planned, the batch's least cost keeps admission honest
                self._busy_until = self._clock() + self._min_cost(len(batch)) / 1e3
            return batch

    def _run_batch(self, batch: list[Ticket]) -> None:
        pending = batch
        while pending:  # a sample whose logits are not finite fails alone; the others run again
            start = self._clock()
            x = pending[0].x if len(pending) == 1 else np.concatenate([t.x for t in pending])
            policy: Any = (_AnytimePolicy(self, pending, start) if self._fixed is None
                           else _FixedPolicy(self, self._fixed))
            try:
                res = self.runner.run(x, policy, start=start)
            except OutputError as e:
                done = getattr(policy, "delivered", np.zeros(len(pending), bool))
                bad = int(e.sample) if 0 <= int(e.sample) < len(pending) else 0
                self._fail(pending[bad], "the model computed NaN or infinite logits for this input: its values are "
                                         "far outside the range the model was trained on; check its preprocessing")
                pending = [t for i, t in enumerate(pending) if i != bad and not done[i] and not t.done()]
                continue
            except Exception as e:  # a bug or a failing session: every request still gets an answer
                msg = f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                for t in pending:
                    if not t.done():
                        self._fail(t, msg)
                return
            now = self._clock()
            with self._lock:
                self._counts["batches"] += 1
                self._counts["batched"] += len(pending)
            done = getattr(policy, "delivered", None)
            if len(pending) == 1 and (done is None or not done[0]):  # one request: no fancy indexing
                self._answer_many(pending, res.probs, [int(res.stage[0])], [int(res.members[0])], 1, start, now)
                return
            left = [i for i in range(len(pending)) if done is None or not done[i]]
            if left:
                self._answer_many([pending[i] for i in left], res.probs[left], res.stage[left].tolist(),
                                  res.members[left].tolist(), len(pending), start, now)
            return

    def _answer_many(self, tickets: Sequence[Ticket], probs: np.ndarray, stages: Sequence[int],
                     members: Sequence[int], batch: int, start: float, now: float) -> None:
        """Answer ``tickets`` (rows of ``probs``) together: the labels and the :data:`RANKED`
        most probable classes of every row come from a few numpy calls per batch (a Python sort
        for a batch of one: :func:`~kdedge.runtime.tickets.rank_lists`), here in the worker, not
        from calls per answer in the thread that sends it."""
        p = np.array(probs, dtype=np.float64)  # their own copy: never a view of the runner's arrays
        top, vals = rank_lists(p, RANKED)  # the first column is the label (argmax: ties go to the lower label)
        answers = []
        for i, t in enumerate(tickets):
            label = top[i][0]
            answers.append(Answer(t.id, OK, probs=p[i], label=label, class_name=self.classes[label],
                                  confidence=vals[i][0], stage=int(stages[i]), members=int(members[i]), batch=batch,
                                  queue_ms=(start - t.arrival) * 1e3, compute_ms=(now - start) * 1e3,
                                  total_ms=(now - t.arrival) * 1e3, deadline_ms=t.deadline_ms,
                                  budget_met=now <= t.deadline, ranked=tuple(zip(top[i], vals[i]))))
        with self._lock:
            for a in answers:
                self._counts[OK] += 1
                self._counts["misses"] += not a.budget_met
                if 0 <= a.stage < len(self._per_stage):
                    self._per_stage[a.stage] += 1
        for t, a in zip(tickets, answers):
            t._finish(a)

    def _fail(self, t: Ticket, message: str, status: str = FAILED) -> None:
        now = self._clock()
        with self._lock:
            self._counts[status] += 1
        t._finish(Answer(t.id, status, message, total_ms=(now - t.arrival) * 1e3, deadline_ms=t.deadline_ms))

    def _loop(self) -> None:
        try:
            if self._warmup:
                self.warmup()
            else:
                self._ready.set()
        except BaseException as e:  # the model cannot run: refuse everything, say why
            self._failure = e
            self._ready.set()
            self._refuse_queued(f"the server cannot run the model: {e}")
            return
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._q or self._closing)
                if not self._q:
                    return  # closing, and nothing left
                if self._closing and not self._drain:
                    break
            self.step(timeout=0.0)
        self._refuse_queued("the server is shutting down; the request was not run")

    def _refuse_queued(self, message: str) -> None:
        with self._cv:
            queued = self._q
            self._q, self._dl = [], []
        for t in queued:
            self._fail(t, message, CLOSED)

    # -- closing -------------------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; answer (``drain``) or refuse every queued one; stop the worker.

        Args:
            drain: answer what is queued (each gets at least stage 0); False refuses it
                (``closed``). The running micro-batch is always finished.
            timeout: seconds to wait for the queue to drain; what is still queued then is refused.
        """
        with self._cv:
            self._closing = True
            self._drain = self._drain and drain
            self._cv.notify_all()
        if self._thread is not None:
            if self._thread is not threading.current_thread():
                self._thread.join(timeout)
                if self._thread.is_alive():  # draining took too long: refuse the rest, then wait for the batch
                    with self._cv:
                        self._drain = False
                    self._refuse_queued("the server is shutting down; the request was not run")
                    self._thread.join()
        elif drain:
            while self.step(timeout=0.0):
                pass
        self._refuse_queued("the server is shutting down; the request was not run")

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
