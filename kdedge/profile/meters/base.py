"""The power-meter interface, the energy integrator and the two meter families.

A meter measures the energy spent between ``start()`` and ``stop()``:

    >>> meter = auto_meter()
    >>> meter.start(); run_stage(); reading = meter.stop()
    >>> reading.joules, reading.mean_watts, reading.samples, reading.period_s

or as a context manager, the reading left on ``meter.reading``:

    >>> with meter:
    ...     run_stage()
    >>> meter.reading.joules

Two families:

- *sampling* meters read instantaneous power (watts per rail) at a period and integrate it over
  time: :class:`PollingMeter` reads on its own background thread (sysfs rails), a
  :class:`StreamMeter` receives samples from a producer it runs (``tegrastats``, ``jtop``);
- *counter* meters (:class:`CounterMeter`) difference a hardware energy counter (RAPL, NVML),
  handling wrap-around.

Energy of a sampled signal is the integral of the piecewise-linear curve through the samples at
their actual timestamps (:func:`integrate`), cut exactly at the start and stop times, so the
partial intervals at both ends count with the power interpolated there. Averaging pairs of
readings and multiplying by the nominal period is what this replaces: it is wrong whenever the
sampling thread is late, which is exactly when the machine is busy.

Nothing here imports more than the standard library; backends load their own dependencies
lazily and say what to install.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

#: Sampling period of polling meters unless told otherwise; ``bench/bench_meter_overhead.py``
#: measures what it costs (docs/power.md).
DEFAULT_PERIOD_S = 0.01
# A sampling period above this cannot resolve any inference window, and an infinite one would
# wait forever for the sample that closes a window.
MAX_PERIOD_S = 10.0

#: Rails that carry the whole board's input power, in order of preference. When one is present
#: it is the total; summing it with the other rails would count their power twice.
#: VDD_IN: Orin Nano / Orin NX / Xavier NX / TX2; POM_5V_IN: Nano (JetPack 4); VIN: the input
#: monitor named on Thor carrier boards (unverified on a device here).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")

clock = time.perf_counter


class PowerError(ValueError):
    """A power meter or power mode cannot do what was asked; the message names the fix."""


class PowerPermissionError(PowerError, PermissionError):
    """The current user may not read a power sensor or change a power setting."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy spent over one measurement window.

    Args:
        joules: energy of the total (the board input rail, or the sum the note names); ``None``
            when energy is not measured.
        mean_watts: ``joules / seconds``; ``None`` when not measured.
        seconds: length of the window (``stop`` time minus ``start`` time).
        samples: power samples taken inside the window (counter reads for counter meters).
        period_s: actual mean time between samples; ``None`` for counter meters and windows
            with fewer than two samples.
        source: name of the meter (``"jetson-sysfs"``, ``"nvml"``, ``"none"``...).
        rails: joules per rail or counter over the window.
        note: what the total is made of, and anything that limits the reading's accuracy.
    """

    joules: float | None
    mean_watts: float | None
    seconds: float
    samples: int
    period_s: float | None
    source: str
    rails: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def measured(self) -> bool:
        """Whether the reading holds a measured energy (False for the ``none`` meter)."""
        return self.joules is not None

    @property
    def millijoules(self) -> float | None:
        return None if self.joules is None else self.joules * 1e3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (profiles store this)."""
        return {
            "joules": self.joules,
            "mean_watts": self.mean_watts,
            "seconds": self.seconds,
            "samples": self.samples,
            "period_s": self.period_s,
            "source": self.source,
            "rails": dict(self.rails),
            "note": self.note,
        }

    def __str__(self) -> str:
        if self.joules is None:
            return f"energy not measured ({self.note})"
        period = f" every {self.period_s * 1e3:.2f} ms" if self.period_s else ""
        return (
            f"{self.joules * 1e3:.3f} mJ over {self.seconds * 1e3:.3f} ms "
            f"({self.mean_watts:.3f} W mean, {self.samples} samples{period}, {self.source})"
        )


@dataclass(frozen=True)
class MeterStatus:
    """Whether a meter works on this machine, and why not when it does not."""

    name: str
    available: bool
    detail: str

    def __bool__(self) -> bool:
        return self.available


def integrate(times: Sequence[float], watts: Sequence[float], t0: float, t1: float) -> float:
    """Energy in joules of a sampled power signal over ``[t0, t1]``.

    The signal is the piecewise-linear curve through the samples ``(times[i], watts[i])``
    (trapezoid rule on the actual timestamps); before the first sample and after the last it is
    held at that sample's value. The window is cut exactly at ``t0`` and ``t1`` with the power
    interpolated there, so the partial intervals at both ends count:

        E = ∫_{t0}^{t1} p(t) dt,  p linear between consecutive samples.

    This is exact for any signal that is linear between samples (constant power, a ramp).

    Args:
        times: sample times in seconds, ascending.
        watts: power at each sample time.
        t0: window start; t1: window end (``t1 >= t0``).

    Returns:
        Joules.

    Example:
        >>> integrate([0.0, 1.0], [2.0, 4.0], 0.0, 1.0)   # a ramp from 2 W to 4 W
        3.0
    """
    if len(times) != len(watts):
        raise ValueError(f"integrate: {len(times)} times but {len(watts)} power values")
    if not times:
        raise ValueError("integrate: no samples to integrate; sample at least once in the window")
    if t1 < t0:
        raise ValueError(f"integrate: window ends ({t1}) before it starts ({t0})")

    def power_at(t: float) -> float:
        i = bisect.bisect_right(times, t)
        if i == 0:
            return float(watts[0])
        if i == len(times):
            return float(watts[-1])
        ta, tb = times[i - 1], times[i]
        if tb == ta:
            return float(watts[i])
        return float(watts[i - 1]) + (float(watts[i]) - float(watts[i - 1])) * (t - ta) / (tb - ta)

    lo = bisect.bisect_right(times, t0)
    hi = bisect.bisect_left(times, t1)
    ts = [t0, *times[lo:hi], t1]
    ps = [power_at(t0), *(float(w) for w in watts[lo:hi]), power_at(t1)]
    return sum((ts[k + 1] - ts[k]) * (ps[k + 1] + ps[k]) * 0.5 for k in range(len(ts) - 1))


def pick_total(rails: Mapping[str, float], total_rail: str | None) -> tuple[float, str]:
    """The total power of one sample and a phrase saying what it is.

    Args:
        rails: watts per rail.
        total_rail: ``None`` (an input rail from :data:`INPUT_RAILS` if present, else the sum),
            ``"sum"``, or the name of the rail that is the total.
    """
    if total_rail == "sum":
        return sum(rails.values()), "sum of rails"
    if total_rail is not None:
        if total_rail not in rails:
            raise PowerError(
                f"total rail {total_rail!r} is not among the rails read ({', '.join(sorted(rails))}); "
                "pass one of them or 'sum'"
            )
        return rails[total_rail], f"total = rail {total_rail}"
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name], f"total = input rail {name}"
    return sum(rails.values()), "total = sum of rails (no board input rail found)"


class Meter:
    """A power meter: ``start()``, ``stop() -> EnergyReading``, or ``with meter: ...``.

    One window at a time. ``close()`` releases what a meter holds open (a subprocess, a
    connection); a meter used as a context manager closes what it opened itself.
    """

    name: ClassVar[str] = "meter"
    reading: EnergyReading | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> EnergyReading:
        raise NotImplementedError

    def probe(self) -> str:
        """Read the sensors once; return a one-line description, or raise :class:`PowerError`."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources held between windows (no-op for most meters)."""

    @classmethod
    def available(cls, **kwargs: Any) -> MeterStatus:
        """Whether this meter works here (constructed with ``kwargs``), and why not.

        Example:
            >>> RaplMeter.available(powercap_root="/sys/class/powercap")
            MeterStatus(name='rapl', available=False, detail='... permission denied ...')
        """
        meter: Meter | None = None
        try:
            meter = cls(**kwargs)
            detail = meter.probe()
        except PowerError as err:
            return MeterStatus(cls.name, False, str(err))
        finally:
            if meter is not None:
                meter.close()
        return MeterStatus(cls.name, True, detail)

    def __enter__(self) -> Meter:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.reading = self.stop()
        except Exception:
            if exc_type is None:
                raise
            # The block's own exception is the one to see; the meter is stopped all the same.


@dataclass
class _Sample:
    t: float
    total: float
    rails: dict[str, float]


class SamplingMeter(Meter):
    """A meter that integrates samples of instantaneous power (watts per rail).

    Subclasses feed samples with :meth:`_add_sample`; this class keeps the samples a window
    needs (plus the last one before it, so the start edge is interpolated) and integrates them.

    Args:
        period_s: requested time between samples.
        total_rail: see :func:`pick_total`.
    """

    def __init__(self, period_s: float = DEFAULT_PERIOD_S, total_rail: str | None = None) -> None:
        if not (isinstance(period_s, (int, float)) and math.isfinite(period_s) and 0 < period_s <= MAX_PERIOD_S):
            raise PowerError(f"sampling period must be > 0 and at most {MAX_PERIOD_S:g} seconds, got {period_s!r}")
        self.period_s = float(period_s)
        self.total_rail = total_rail
        self._samples: list[_Sample] = []
        self._cond = threading.Condition()
        self._t0: float | None = None
        self._total_phrase = ""
        self._error: BaseException | None = None

    # -- feeding -----------------------------------------------------------------------------
    def _add_sample(self, t: float, rails: Mapping[str, float]) -> None:
        total, phrase = pick_total(rails, self.total_rail)
        with self._cond:
            self._total_phrase = phrase
            if self._t0 is None:
                # Outside a window only the latest sample matters (it brackets the next start).
                self._samples[:] = [_Sample(t, total, dict(rails))]
            else:
                self._samples.append(_Sample(t, total, dict(rails)))
            self._cond.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            self._error = err
            self._cond.notify_all()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    # -- windows -----------------------------------------------------------------------------
    def _begin_window(self) -> None:
        with self._cond:
            if self._t0 is not None:
                raise PowerError(f"{self.name} meter already started; call stop() before start()")
            self._t0 = clock()
            # Keep only the last sample before the start: it brackets the start edge.
            self._samples[:] = [s for s in self._samples[-1:] if s.t <= self._t0]

    def _end_window(self, t1: float) -> EnergyReading:
        with self._cond:
            t0, self._t0 = self._t0, None
            samples = list(self._samples)
            phrase = self._total_phrase
            self._samples[:] = samples[-1:]
        if t0 is None:
            raise PowerError(f"{self.name} meter was not started; call start() first")
        self._raise_pending()
        if not samples:
            raise PowerError(f"{self.name} meter took no samples between start() and stop()")
        times = [s.t for s in samples]
        joules = integrate(times, [s.total for s in samples], t0, t1)
        rail_names = sorted({name for s in samples for name in s.rails})
        rails = {}
        for name in rail_names:
            pts = [(s.t, s.rails[name]) for s in samples if name in s.rails]
            rails[name] = integrate([p[0] for p in pts], [p[1] for p in pts], t0, t1)
        inside = [t for t in times if t0 <= t <= t1]
        span = inside if len(inside) >= 2 else times
        period = (span[-1] - span[0]) / (len(span) - 1) if len(span) >= 2 else None
        notes = [phrase]
        if times[0] > t0:
            notes.append("no sample before start: power held at the first sample")
        if times[-1] < t1:
            notes.append("no sample after stop: power held at the last sample")
        seconds = t1 - t0
        return EnergyReading(
            joules=joules,
            mean_watts=joules / seconds if seconds > 0 else math.nan,
            seconds=seconds,
            samples=len(inside),
            period_s=period,
            source=self.name,
            rails=rails,
            note="; ".join(notes),
        )


class PollingMeter(SamplingMeter):
    """A sampling meter that reads its sensors on a background thread every ``period_s``.

    Subclasses implement :meth:`_read` (watts per rail). One sample is taken synchronously at
    ``start()`` and one at ``stop()``, so both edges are bracketed; the thread fills in between
    on a fixed schedule (deadlines do not drift when a read is late).
    """

    #: Run the sampling thread under ``SCHED_BATCH`` (Linux): a batch thread does not preempt
    #: the thread it wakes up next to, so the inference thread is not pushed back in the run
    #: queue every period. Samples may then come a little late, which costs no accuracy (they
    #: are stamped when read) -- see docs/power.md for the measured effect.
    batch_scheduling: bool = True

    def _read(self) -> dict[str, float]:
        raise NotImplementedError

    def _sample_now(self) -> None:
        before = clock()
        rails = self._read()
        # The read takes a while (an I2C transaction on a board); stamp its midpoint.
        self._add_sample((before + clock()) * 0.5, rails)

    def _loop(self, stop: threading.Event, first: float) -> None:
        if self.batch_scheduling and hasattr(os, "SCHED_BATCH"):
            try:  # pid 0: this thread only
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            except OSError:
                pass
        k = 1
        try:
            while True:
                deadline = first + k * self.period_s
                now = clock()
                if deadline < now:  # late: skip the missed slots instead of bursting
                    k = int((now - first) / self.period_s) + 1
                    deadline = first + k * self.period_s
                if stop.wait(deadline - now):
                    return
                self._sample_now()
                k += 1
        except BaseException as err:  # surfaced by stop()
            self._fail(err)

    def probe(self) -> str:
        rails = self._read()
        _, phrase = pick_total(rails, self.total_rail)
        return f"{len(rails)} rails ({', '.join(sorted(rails))}); {phrase}"

    def start(self) -> None:
        self._begin_window()
        try:
            self._sample_now()
        except BaseException:
            with self._cond:
                self._t0 = None
            raise
        self._stop_event = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(self._stop_event, clock()), name=f"kdedge-{self.name}-meter", daemon=True
        )
        self._thread.start()

    def stop(self) -> EnergyReading:
        t1 = clock()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self._stop_event.set()
            thread.join()
            self._thread = None
        try:
            if self._t0 is not None and self._error is None:
                self._sample_now()
        except BaseException:
            with self._cond:
                self._t0 = None
            raise
        return self._end_window(t1)


class StreamMeter(SamplingMeter):
    """A sampling meter fed by a producer it runs (a subprocess, a client connection).

    The producer stays up between windows once :meth:`open` (or :meth:`session`) is called, so a window's start is
    bracketed by the last sample before it; ``start()`` opens it when needed (and ``stop()``
    then closes it again). ``stop()`` waits, up to a few periods, for the first sample after
    the stop time so the end edge is interpolated rather than held.

    Subclasses implement :meth:`_open_stream` / :meth:`_close_stream` and call
    :meth:`_add_sample` from their producer thread (or :meth:`_fail` on an error).
    """

    #: Seconds to wait for the first sample after opening.
    startup_timeout_s: float = 10.0

    def __init__(self, period_s: float, total_rail: str | None = None, wait_for_edge: bool = True) -> None:
        super().__init__(period_s, total_rail)
        self.wait_for_edge = wait_for_edge
        self._open = False
        self._opened_by_start = False

    def _open_stream(self) -> None:
        raise NotImplementedError

    def _close_stream(self) -> None:
        raise NotImplementedError

    def open(self) -> StreamMeter:
        """Start the producer and wait for its first sample."""
        if self._open:
            return self
        with self._cond:
            self._samples.clear()
            self._error = None
        self._open_stream()
        self._open = True
        try:
            self._wait_for(lambda: bool(self._samples), self.startup_timeout_s, "its first sample")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._open:
            self._open = False
            self._close_stream()

    @contextlib.contextmanager
    def session(self) -> Iterator[StreamMeter]:
        """Keep the producer running for several windows: ``with meter.session(): ...``."""
        self.open()
        try:
            yield self
        finally:
            self.close()

    def _wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> bool:
        deadline = clock() + timeout
        with self._cond:
            while not ready():
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                left = deadline - clock()
                if left <= 0:
                    if what:
                        raise PowerError(
                            f"{self.name} meter: no {what} within {timeout:.1f} s; "
                            f"check that it runs on this machine (try a longer period?)"
                        )
                    return False
                self._cond.wait(left)
        return True

    def probe(self) -> str:
        was_open = self._open
        self.open()
        try:
            with self._cond:
                rails = dict(self._samples[-1].rails)
            _, phrase = pick_total(rails, self.total_rail)
            return f"{len(rails)} rails ({', '.join(sorted(rails))}); {phrase}"
        finally:
            if not was_open:
                self.close()

    def start(self) -> None:
        if not self._open:
            self.open()
            self._opened_by_start = True
        self._raise_pending()
        self._begin_window()

    def stop(self) -> EnergyReading:
        t1 = clock()
        try:
            if self.wait_for_edge and self._t0 is not None:
                # Not an error when it does not come: the end is then held (and the note says so).
                self._wait_for(
                    lambda: bool(self._samples) and self._samples[-1].t >= t1, 3 * self.period_s + 0.5, ""
                )
            return self._end_window(t1)
        finally:
            if self._opened_by_start:
                self._opened_by_start = False
                self.close()
