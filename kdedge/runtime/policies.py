"""Stop policies: before each stage, decide whether (and for which samples) the runner goes on.

A policy is a small object with one decision method, ``decide(ctx) -> Decision``. The runner
calls it before stage 0 (where a policy may pick a fused prefix graph instead: budget mode)
and before every later stage, with a :class:`Context`: the stage about to run, the time spent,
the active batch and (computed on first access) the combined probabilities so far. Stage 0
always runs, whatever the decision: the runner always returns an answer.

Built in:

- :class:`Full`: every stage.
- :class:`Fixed`: the first k stages, through the fused prefix graph when the bundle has one.
- :class:`Deadline`: go on only if the next stage's profiled latency (a high percentile) plus a
  margin fits in the time left; a watchdog aborts a stage that overruns where the target can.
- :class:`Confidence`: per sample, stop once the combined max-probability (or top-1 margin)
  reaches a threshold; samples that are done leave the batch.
- :class:`AllOf`: several policies at once (a sample goes on only if all say so).

- :class:`Energy`: go on only while the next stage's profiled mean energy fits the budget;
  it reads ``ctx.cost(graph, metric="energy_mj", stat="mean")`` exactly as :class:`Deadline`
  reads latency.

Every cost a policy plans with is a finite number >= 0: explicit ones are checked when the
policy is built, profiled ones by :meth:`Context.cost` at each lookup (a ``ProfileError``
otherwise). A NaN would not fail loudly by itself; it would make ``latency + margin > left``
False and silently switch the deadline off.

Policies hold no per-call state, so one policy object may serve several threads at once; the
one state a policy keeps across requests is the online load estimate of
``Deadline(online=N)``, which threads sharing the policy share (a race loses an observation).

Example:
    >>> class FirstTwo:                          # a user policy: stages 0 and 1 only
    ...     name, budget_ms, needs_profile = "first-two", None, False
    ...     def decide(self, ctx):
    ...         return CONTINUE if ctx.stage < 2 else STOP
    >>> runner.run(x, policy=FirstTwo())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "AllOf", "CONTINUE", "Confidence", "Context", "Deadline", "Decision", "Energy", "Fixed", "Full", "Policy", "STOP",
    "confidence_of", "make_policy",
]


@dataclass(frozen=True)
class Decision:
    """What to do before a stage.

    Args:
        go: True (every active sample runs the stage), False (stop here), or a boolean mask over
            the active samples: those True run the stage, the others leave with the answer
            they have.
        fused: before stage 0 only: run the fused prefix graph ``prefix{fused}`` instead of the
            stages, then stop (budget mode).
        abort_after_ms: abort the stage (where the target can) if it is still running this many
            milliseconds after the request started; the previous answer is returned.
    """

    go: bool | np.ndarray = True
    fused: int | None = None
    abort_after_ms: float | None = None


CONTINUE = Decision(True)
STOP = Decision(False)


class Context:
    """What a policy knows before a stage. Built by the runner; policies only read it.

    Attributes:
        stage: index of the stage about to run (0 … num_stages-1).
        num_stages: stages in the bundle.
        elapsed_ms: time since the request started.
        batch: samples still active.
        members: members averaged so far (0 before stage 0).
        prefixes: number of fused prefix graphs in the bundle (``prefix0`` …).
    """

    __slots__ = ("stage", "num_stages", "elapsed_ms", "batch", "members", "prefixes", "_probs_fn", "_probs",
                 "_cost_fn")

    def __init__(self, stage: int, num_stages: int, elapsed_ms: float, batch: int, members: int, prefixes: int,
                 probs_fn: Callable[[], np.ndarray] | None, cost_fn: Callable[[str, int, str, str], float]) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.elapsed_ms = elapsed_ms
        self.batch = batch
        self.members = members
        self.prefixes = prefixes
        self._probs_fn = probs_fn
        self._probs: np.ndarray | None = None
        self._cost_fn = cost_fn

    @property
    def probs(self) -> np.ndarray | None:
        """Combined class probabilities [batch, classes] of the active samples after stages
        0..stage-1 (None before stage 0); computed on first access."""
        if self._probs is None and self._probs_fn is not None:
            self._probs = self._probs_fn()
        return self._probs

    def cost(self, graph: str, stat: str = "p99", metric: str = "latency_ms") -> float:
        """A profiled cost of ``graph`` (``stage2``, ``prefix1``) at the active batch size, from the
        latency profile of this device and setting.

        Raises:
            ProfileError: no usable profile (the message says how to make one), the profile
                does not have ``metric``, or the lookup gave a cost that is not a finite number
                >= 0 (a policy would otherwise switch itself off: ``NaN > left`` is False).
        """
        return _finite_cost(self._cost_fn(graph, self.batch, stat, metric), graph, self.batch, stat, metric)


def _finite_cost(v: Any, graph: str, batch: int, stat: str, metric: str) -> float:
    """``v`` as a float when it is a finite number >= 0; else the ProfileError that stops the
    request before a policy plans with it."""
    if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return float(v)
    from kdedge.bundle.profile.spec import ProfileError

    unit = " " + metric.rsplit("_", 1)[-1] if "_" in metric else ""
    raise ProfileError(f"the profile gives {graph} at batch {batch} a {stat} {metric} of {v!r}{unit}; a cost must "
                       "be a finite number >= 0, so no policy can plan with it: profile the bundle again "
                       "(kdedge profile)")


def _costs(values: Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    """Explicit per-stage costs (``latencies_ms=``, ``energies_mj=``), each a finite number >= 0."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{what} must be a sequence of numbers, got {type(values).__name__}")
    out = []
    for i, v in enumerate(list(values)):
        if not (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0):
            raise ValueError(f"{what}[{i}] must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    if not out:
        raise ValueError(f"{what} is empty; give one value per stage")
    return tuple(out)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@runtime_checkable
class Policy(Protocol):
    """The policy interface.

    Attributes:
        name: short name for results and reports.
        budget_ms: the latency budget a result is checked against (``budget_met``), or None.
        needs_profile: the runner must load the latency profile of this device and setting
            before the first request (so that a missing or stale one fails early and clearly).
    """

    name: str
    budget_ms: float | None
    needs_profile: bool

    def decide(self, ctx: Context) -> Decision:
        """The decision before stage ``ctx.stage``."""


class Full:
    """Run every stage."""

    name = "full"
    budget_ms: float | None = None
    needs_profile = False

    def decide(self, ctx: Context) -> Decision:
        return CONTINUE

    def __repr__(self) -> str:
        return "Full()"


class Fixed:
    """Run the first ``stages`` stages (budget mode).

    Args:
        stages: how many stages, 1 … the bundle's stage count.
        fused: use the fused prefix graph ``prefix{stages-1}`` when the bundle has one (faster
            than the stages one by one; same prediction under ``mean_logits``).

    Raises:
        ValueError: ``stages`` below 1 or above the bundle's stage count (at the first request).
    """

    budget_ms: float | None = None
    needs_profile = False

    def __init__(self, stages: int, fused: bool = True) -> None:
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"a fixed policy runs at least 1 stage, got stages={stages!r}")
        self.stages = stages
        self.fused = fused
        self.name = f"fixed-{stages}" + ("-fused" if fused else "")

    def decide(self, ctx: Context) -> Decision:
        if ctx.stage == 0:
            if self.stages > ctx.num_stages:
                raise ValueError(f"--stages {self.stages} asks for more stages than the bundle has "
                                 f"({ctx.num_stages}); use 1..{ctx.num_stages}")
            if self.fused and self.stages - 1 < ctx.prefixes:
                return Decision(True, fused=self.stages - 1)
            return CONTINUE
        return CONTINUE if ctx.stage < self.stages else STOP

    def __repr__(self) -> str:
        return f"Fixed({self.stages}, fused={self.fused})"


class Deadline:
    """Go on only while the next stage fits in the time left.

    Before stage k ≥ 1: continue if ``latency(k) + margin_ms <= deadline_ms - elapsed``, where
    ``latency(k)`` is the profiled ``stat`` (default p99) of stage k at the active batch size on
    this device and setting. A stage that is started but overruns is aborted by the runner's
    watchdog at ``deadline_ms - margin_ms`` where the target can abort (for stages predicted to
    take at least ``watchdog_min_ms``), and the previous answer is returned. Stage 0 always
    runs: a deadline shorter than stage 0 still returns stage 0's answer, marked as a miss.

    With ``fused=True`` (budget mode: the deadline is known when the request starts) and a
    bundle with fused prefix graphs, the policy instead runs, before stage 0, the deepest prefix
    whose profiled ``stat`` plus the margin fits; one fused graph is faster than its stages one
    by one, but it is all or nothing (an abort leaves no earlier answer, so it is not armed).
    When no prefix fits it falls back to the stages.

    Args:
        deadline_ms: the per-request latency budget, from the request's start.
        margin_ms: safety margin for what follows a stage (combination, result) and jitter.
        stat: which profile statistic predicts a stage: ``p99`` (default), ``p95``, ``p90``,
            ``median``, ``mean``, ``max``.
        latencies_ms: explicit per-stage latencies instead of the profile (tests, simulations).
        watchdog: abort overrunning stages (where the target can).
        watchdog_min_ms: arm the watchdog only for stages predicted to take at least this long.
            Arming wakes a Python thread, which needs the GIL: on a 2-core machine this cost
            25–50 µs per request and, under load, millisecond stalls — more than an abort can
            save on a sub-millisecond stage (docs/runtime.md, benchmarks).
        fused: budget mode through the fused prefix graphs (see above).
        prefix_latencies_ms: explicit per-prefix latencies for ``fused`` (tests, simulations).
    """

    def __init__(self, deadline_ms: float, margin_ms: float = 0.1, stat: str = "p99",
                 latencies_ms: Sequence[float] | None = None, watchdog: bool = True,
                 watchdog_min_ms: float = 1.0, fused: bool = False,
                 prefix_latencies_ms: Sequence[float] | None = None, online: bool | int = False) -> None:
        if not (_number(deadline_ms) and deadline_ms > 0):
            raise ValueError(f"the deadline must be a positive number of milliseconds, got {deadline_ms!r}")
        if not (_number(margin_ms) and margin_ms >= 0):
            raise ValueError(f"the deadline margin must be a finite number >= 0 ms, got {margin_ms!r}")
        from kdedge.bundle.profile.spec import STATS

        if stat not in STATS:
            raise ValueError(f"unknown latency statistic {stat!r}; known: {', '.join(STATS)}")
        if not (_number(watchdog_min_ms) and watchdog_min_ms >= 0):
            raise ValueError(f"watchdog_min_ms must be a finite number >= 0, got {watchdog_min_ms!r}")
        self.deadline_ms = float(deadline_ms)
        self.margin_ms = float(margin_ms)
        self.stat = stat
        self.latencies_ms = _costs(latencies_ms, "latencies_ms")
        self.prefix_latencies_ms = _costs(prefix_latencies_ms, "prefix_latencies_ms")
        self.watchdog = watchdog
        self.watchdog_min_ms = float(watchdog_min_ms)
        self.fused = fused
        self.budget_ms: float | None = self.deadline_ms
        self.needs_profile = self.latencies_ms is None or (fused and self.prefix_latencies_ms is None)
        from kdedge.runtime.online import DEFAULT_WINDOW, LoadEstimate

        if online is True:
            online = DEFAULT_WINDOW
        self.load: LoadEstimate | None = LoadEstimate(int(online)) if online else None
        self.name = f"deadline-{self.deadline_ms:g}ms" + ("-fused" if fused else "") + ("-online" if online else "")

    def _planned(self, graph: str, k: int, num: int, cost: Callable[[str], float]) -> float:
        """What ``graph`` (``stage{k}`` / ``prefix{k}``) is planned to take, before the load factor."""
        given = self.latencies_ms if graph.startswith("stage") else self.prefix_latencies_ms
        if given is not None:
            if len(given) != num:
                what = "latencies" if graph.startswith("stage") else "prefix latencies"
                raise ValueError(f"{len(given)} {what} given for {num} {'stages' if what == 'latencies' else 'prefixes'}")
            return given[k]
        return cost(graph)

    def latency(self, ctx: Context, k: int) -> float:
        base = self._planned(f"stage{k}", k, ctx.num_stages, lambda g: ctx.cost(g, self.stat))
        return base * self.load.factor() if self.load is not None else base

    def prefix_latency(self, ctx: Context, j: int) -> float:
        base = self._planned(f"prefix{j}", j, ctx.prefixes, lambda g: ctx.cost(g, self.stat))
        return base * self.load.factor() if self.load is not None else base

    def observe(self, graph: str, ms: float, batch: int, num: int, cost: Callable[[str, int, str, str], float]) -> None:
        """The runner reports each graph run (``num``: stages or prefixes of its kind): with
        ``online``, its ratio to the planned time feeds the load estimate
        (:mod:`kdedge.runtime.online`)."""
        if self.load is None:
            return
        k = int(graph[6:]) if graph.startswith("prefix") else int(graph[5:])
        self.load.observe(ms, self._planned(graph, k, num, lambda g: cost(g, batch, self.stat, "latency_ms")))

    def decide(self, ctx: Context) -> Decision:
        left = self.deadline_ms - ctx.elapsed_ms
        if ctx.stage == 0:
            if self.fused:
                for j in range(ctx.prefixes - 1, -1, -1):
                    if self.prefix_latency(ctx, j) + self.margin_ms <= left:
                        return Decision(True, fused=j)
            return CONTINUE  # stage 0 always runs, unguarded: it is the answer of last resort
        latency = self.latency(ctx, ctx.stage)
        if latency + self.margin_ms > left:
            return STOP
        if self.watchdog and latency >= self.watchdog_min_ms:
            return Decision(True, abort_after_ms=self.deadline_ms - self.margin_ms)
        return CONTINUE

    def __repr__(self) -> str:
        return (f"Deadline({self.deadline_ms:g}, margin_ms={self.margin_ms:g}, stat={self.stat!r}"
                + (", fused=True" if self.fused else "") + (f", online={self.load.window}" if self.load else "") + ")")


MEASURES = ("max", "margin")


class Energy:
    """Go on only while the next stage's energy fits in the energy budget of the request.

    Before stage k ≥ 1: continue if ``spent + energy(k) <= budget_mj``, where ``spent`` is the
    profiled energy of stages 0..k-1 and ``energy(k)`` the profiled energy of stage k, both at
    the active batch size, from the ``energy_mj`` of the latency profile of this device and
    setting (``kdedge profile BUNDLE --meter auto``). The budget is per request (one runner
    call; at batch 1, one inference), like the profile's energy.

    Which statistic: the **mean** energy per inference. A power meter cannot resolve one stage
    (it is sampled every few ms), so the profile measures energy over windows of many runs and
    only the mean per inference exists; there is no p99 of energy to be conservative with. Use
    ``margin_mj`` for headroom. ``spent`` is predicted from the profile, not metered live.

    Stage 0 always runs: a budget below stage 0's energy still returns stage 0's answer.

    Args:
        budget_mj: the energy budget per request, in millijoules.
        margin_mj: headroom kept free of the budget.
        energies_mj: explicit per-stage energies instead of the profile (tests, simulations).

    Raises:
        ValueError: a budget that is not a positive number.
        ProfileError: (at the first request) the profile has no energy; the message says how
            to measure it.

    Example:
        >>> runner.run(x, policy=Energy(5.0))     # at most ~5 mJ per request
    """

    budget_ms: float | None = None

    def __init__(self, budget_mj: float, margin_mj: float = 0.0,
                 energies_mj: Sequence[float] | None = None) -> None:
        if not (_number(budget_mj) and budget_mj > 0):
            raise ValueError(f"the energy budget must be a positive number of millijoules, got {budget_mj!r}")
        if not (_number(margin_mj) and margin_mj >= 0):
            raise ValueError(f"the energy margin must be a finite number >= 0 mJ, got {margin_mj!r}")
        self.budget_mj = float(budget_mj)
        self.margin_mj = float(margin_mj)
        self.energies_mj = _costs(energies_mj, "energies_mj")
        self.needs_profile = self.energies_mj is None
        self.name = f"energy-{self.budget_mj:g}mJ"

    def energy(self, ctx: Context, k: int) -> float:
        """The predicted energy (mJ) of stage ``k`` at the active batch size."""
        if self.energies_mj is not None:
            if len(self.energies_mj) != ctx.num_stages:
                raise ValueError(f"{len(self.energies_mj)} energies given for {ctx.num_stages} stages")
            return self.energies_mj[k]
        return ctx.cost(f"stage{k}", "mean", "energy_mj")

    def decide(self, ctx: Context) -> Decision:
        if ctx.stage == 0:
            self.energy(ctx, 0)  # a profile without energy is refused before anything runs
            return CONTINUE
        spent = sum(self.energy(ctx, k) for k in range(ctx.stage))
        if spent + self.energy(ctx, ctx.stage) + self.margin_mj > self.budget_mj:
            return STOP
        return CONTINUE

    def __repr__(self) -> str:
        return f"Energy({self.budget_mj:g}" + (f", margin_mj={self.margin_mj:g})" if self.margin_mj else ")")


def confidence_of(probs: np.ndarray, measure: str = "max") -> np.ndarray:
    """Per-sample confidence of probabilities [N, K]: the max probability, or the margin between
    the two largest (``margin``)."""
    if measure == "max":
        return probs.max(axis=-1)
    if measure == "margin":
        if probs.shape[-1] < 2:
            return probs.max(axis=-1)
        top2 = np.partition(probs, -2, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    raise ValueError(f"unknown confidence measure {measure!r}; known: {', '.join(MEASURES)}")


class Confidence:
    """Stop, per sample, once the combined prediction is confident enough.

    Before stage k ≥ 1, a sample whose confidence after stages 0..k-1 reaches the threshold of
    exit k-1 leaves the batch with that answer; the others run stage k.

    Args:
        threshold: one threshold in [0, 1] for every exit, or one per exit (e.g. fitted on
            validation data by ``kdedge.runtime.exits.fit_thresholds``; a sample leaves exit k
            when ``confidence >= threshold[k]``; the last exit's value is not used).
        measure: ``max`` (max probability) or ``margin`` (top-1 minus top-2 probability).
    """

    budget_ms: float | None = None
    needs_profile = False

    def __init__(self, threshold: float | Sequence[float], measure: str = "max") -> None:
        values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
        if not values or not all(_number(v) and v >= 0 for v in values):
            raise ValueError(f"confidence thresholds must be numbers >= 0 (probabilities), got {threshold!r}")
        from kdedge.runtime.exits import NEVER

        # above 1 no confidence ever reaches it: the policy would silently run every stage
        # (``--confidence 90`` meaning 90 %); only a per-exit list may close an exit with NEVER
        allowed = (lambda v: v <= 1 or v == NEVER) if not isinstance(threshold, (int, float)) else (lambda v: v <= 1)
        if not all(allowed(v) for v in values):
            raise ValueError(f"confidence thresholds are probabilities from 0 to 1 (a per-exit list may close an "
                             f"exit with kdedge.runtime.exits.NEVER = {NEVER:g}), got {threshold!r}; for 90 %, "
                             "write 0.9")
        if measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {measure!r}; known: {', '.join(MEASURES)}")
        self.thresholds = tuple(float(v) for v in values)
        self.per_exit = not isinstance(threshold, (int, float))
        self.measure = measure
        self.name = f"confidence-{measure}" + ("" if self.per_exit else f"-{self.thresholds[0]:g}")

    def threshold(self, exit_index: int, num_stages: int) -> float:
        if not self.per_exit:
            return self.thresholds[0]
        if len(self.thresholds) not in (num_stages - 1, num_stages):
            raise ValueError(f"{len(self.thresholds)} confidence thresholds for {num_stages} stages; give "
                             f"{num_stages - 1} or {num_stages}")
        return self.thresholds[exit_index]

    def decide(self, ctx: Context) -> Decision:
        if ctx.stage == 0:
            return CONTINUE
        th = self.threshold(ctx.stage - 1, ctx.num_stages)
        probs = ctx.probs
        assert probs is not None
        go = confidence_of(probs, self.measure) < th
        if go.all():
            return CONTINUE
        if not go.any():
            return STOP
        return Decision(go)

    def __repr__(self) -> str:
        th = list(self.thresholds) if self.per_exit else self.thresholds[0]
        return f"Confidence({th!r}, measure={self.measure!r})"


class AllOf:
    """Several policies at once: a sample runs a stage only if every policy lets it; the
    earliest abort time wins; the budget is the smallest one. Fused prefixes are not used.

    Example:
        >>> runner.run(x, policy=AllOf(Deadline(5.0), Confidence(0.9)))
    """

    def __init__(self, *policies: Any) -> None:
        if not policies:
            raise ValueError("AllOf needs at least one policy")
        self.policies = tuple(policies)
        budgets = [p.budget_ms for p in policies if p.budget_ms is not None]
        self.budget_ms: float | None = min(budgets) if budgets else None
        self.needs_profile = any(getattr(p, "needs_profile", False) for p in policies)
        self.name = "+".join(p.name for p in policies)
        self._observers = [p.observe for p in policies if hasattr(p, "observe")]
        if self._observers:
            self.observe = self._observe

    def _observe(self, graph: str, ms: float, batch: int, num: int, cost: Callable[[str, int, str, str], float]) -> None:
        for fn in self._observers:
            fn(graph, ms, batch, num, cost)

    def decide(self, ctx: Context) -> Decision:
        go: bool | np.ndarray = True
        abort: float | None = None
        for p in self.policies:
            d = p.decide(ctx)
            if d.abort_after_ms is not None:
                abort = d.abort_after_ms if abort is None else min(abort, d.abort_after_ms)
            if d.go is False:
                if ctx.stage > 0:
                    return STOP
                continue
            if d.go is not True:
                go = d.go if go is True else (go & d.go)
        if go is not True and not np.any(go):
            return STOP
        return Decision(go, abort_after_ms=abort)

    def __repr__(self) -> str:
        return f"AllOf({', '.join(repr(p) for p in self.policies)})"


def make_policy(*, deadline_ms: float | None = None, confidence: float | Sequence[float] | None = None,
                stages: int | None = None, fused: bool | None = None, margin_ms: float = 0.1, stat: str = "p99",
                measure: str = "max", energy_mj: float | None = None, online: bool | int = False) -> Any:
    """The policy for a set of command-line style options.

    ``stages`` alone gives :class:`Fixed`; ``deadline_ms``, ``energy_mj`` and/or ``confidence``
    give :class:`Deadline`, :class:`Energy`, :class:`Confidence` or several (:class:`AllOf`);
    nothing gives :class:`Full`.
    ``fused`` (budget mode through fused prefixes) defaults to True for ``stages`` and False
    for a deadline.

    Raises:
        ValueError: ``stages`` together with a deadline or a confidence threshold.
    """
    if stages is not None:
        if deadline_ms is not None or confidence is not None or energy_mj is not None:
            raise ValueError("--stages fixes the stages in advance; it cannot be combined with --deadline-ms, "
                             "--energy-mj or --confidence (drop one)")
        return Fixed(stages, fused=True if fused is None else fused)
    chosen: list[Any] = []
    if deadline_ms is not None:
        if fused and confidence is not None:
            raise ValueError("--fused runs one fused graph chosen in advance; it cannot be combined with "
                             "--confidence, which decides per sample after each stage (drop one)")
        if fused and energy_mj is not None:
            raise ValueError("--fused runs one fused graph chosen by latency; it cannot be combined with "
                             "--energy-mj, which budgets the stages one by one (drop one)")
        chosen.append(Deadline(deadline_ms, margin_ms=margin_ms, stat=stat, fused=bool(fused), online=online))
    if energy_mj is not None:
        chosen.append(Energy(energy_mj))
    if confidence is not None:
        chosen.append(Confidence(confidence, measure=measure))
    if not chosen:
        return Full()
    return chosen[0] if len(chosen) == 1 else AllOf(*chosen)
