"""How the device runs *now*, from what the last requests took: an online load factor for the
deadline policy. numpy-free, torch-free, a few hundred nanoseconds per stage.

A latency profile says what a stage takes on this device when it was measured. When the device
gets busy (another process takes the CPUs), every stage takes longer, and a policy that plans
with the profile alone runs stages it cannot finish in time. The runner reports each stage's
measured time to the policy; the policy keeps the ratio of measured time to profiled time (its
planning statistic, e.g. p99) of the last ``window`` stages run, of any graph, and plans the
next stage at ``profiled x max(1, largest recent ratio)``.

- Device-wide, not per stage: stage 0 runs in every request, so the estimate stays fresh even
  when deeper stages are skipped because of it; a device that quiets down goes deeper again
  once ``window`` stages have run at their usual speed.
- Relative to the planning statistic: on a quiet device measured times stay below their p99,
  the factor is 1 and the plan is the profile's.
- A maximum, not a mean: what breaks deadlines is the tail.
- Optionally forgetful (``horizon_s``): a server sheds what it cannot serve in time, and a shed
  request runs no stage, so after a burst nothing would ever bring a high factor down again.
  With a horizon, an estimate whose newest observation is older than ``horizon_s`` is forgotten
  and the plan is the profile's again; the next stages measure the device afresh.
"""

from __future__ import annotations

import math
import time
from typing import Callable

DEFAULT_WINDOW = 32


class LoadEstimate:
    """The largest (or ``rank``-th largest) ratio of measured to expected time over the last
    ``window`` observations.

    Args:
        window: observations remembered (stages, of any graph).
        clip: ratios above this are taken as this (a single stall of seconds must not keep the
            runner at stage 0 for the whole window and beyond: it leaves the window anyway).
        rank: the factor is the ``rank``-th largest ratio (1: the largest). A server running
            many short stages back to back on a shared machine takes ``1 + window // 8``: one
            stage preempted for milliseconds (a ratio of 100 on a 0.1 ms stage) then does not
            make every request of the next ``window`` stages shallow, while a device busy for
            longer slows most stages and the factor follows it.

        horizon_s: forget every observation when none came for this many seconds of ``clock``
            (None: never; the runner, whose every request runs stage 0, needs none).
        clock: the time source of ``horizon_s``, in seconds.

    Example:
        >>> est = LoadEstimate(window=4)
        >>> est.observe(2.0, 1.0); est.factor()
        2.0
    """

    __slots__ = ("window", "clip", "rank", "horizon_s", "_clock", "_ring", "_i", "_max", "_stale", "_last")

    def __init__(self, window: int = DEFAULT_WINDOW, clip: float = 1e3, rank: int = 1,
                 horizon_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 1_000_000:
            raise ValueError(f"the online window must be an integer from 1 to 1000000 observations, got {window!r}")
        if not (isinstance(clip, (int, float)) and 1.0 <= clip < float("inf")):
            raise ValueError(f"the online clip must be a finite number >= 1, got {clip!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= window:
            raise ValueError(f"the online rank must be an integer from 1 to the window ({window}), got {rank!r}")
        if horizon_s is not None and not (isinstance(horizon_s, (int, float)) and not isinstance(horizon_s, bool)
                                          and 0.0 < horizon_s < float("inf")):
            raise ValueError(f"the online horizon must be a finite number of seconds > 0, got {horizon_s!r}")
        self.window = window
        self.clip = float(clip)
        self.horizon_s = None if horizon_s is None else float(horizon_s)
        self._clock = clock
        self._last = -math.inf
        self.rank = rank
        self._ring = [0.0] * window
        self._i = 0
        self._max = 0.0
        self._stale = False

    def observe(self, measured_ms: float, expected_ms: float) -> None:
        """Record one stage: it took ``measured_ms`` where ``expected_ms`` was planned."""
        if not expected_ms > 0 or not measured_ms >= 0:  # also refuses NaN
            return
        r = min(measured_ms / expected_ms, self.clip)
        if self.horizon_s is not None:
            self._last = self._clock()
        i = self._i
        old = self._ring[i]
        self._ring[i] = r
        self._i = i + 1 if i + 1 < self.window else 0
        if self.rank > 1:
            self._stale = True  # the rank-th largest: recomputed lazily when asked
        elif r >= self._max:
            self._max = r
        elif old >= self._max:  # the maximum left the window: recompute lazily
            self._stale = True

    def factor(self) -> float:
        """max(1, the largest (``rank``-th largest) recent ratio): what planned latencies are multiplied by."""
        if self.horizon_s is not None and self._last > -math.inf and self._clock() - self._last > self.horizon_s:
            self._ring = [0.0] * self.window  # nothing ran for a horizon: what the window says is stale
            self._max = 0.0
            self._stale = False
            self._last = -math.inf
        if self._stale:
            self._max = max(self._ring) if self.rank == 1 else sorted(self._ring)[-self.rank]
            self._stale = False
        m = self._max
        return m if m > 1.0 else 1.0

    def reset(self) -> None:
        self._ring = [0.0] * self.window
        self._i = 0
        self._max = 0.0
        self._stale = False

