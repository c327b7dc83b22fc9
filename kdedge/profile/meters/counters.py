"""Meters over cumulative energy counters (RAPL, NVML's total energy): differencing with wrap-around,
a guard thread for long windows, and reading sysfs attributes."""

from __future__ import annotations

import math
import os
import threading
from typing import Mapping

from kdedge.profile.meters.base import EnergyReading, Meter, PowerError, PowerPermissionError, clock

__all__ = ["AttributeReader", "CounterMeter", "counter_delta", "read_number"]


class CounterMeter(Meter):
    """A meter that differences cumulative energy counters (joules per counter).

    Subclasses implement :meth:`_read_counters` (joules since an arbitrary origin) and may give
    :meth:`_ranges` (joules at which a counter wraps to zero). A guard thread re-reads the
    counters every ``guard_period_s`` during a window so that a counter that wraps more than
    once in a long window is still accounted for.
    """

    def __init__(self, guard_period_s: float = 1.0) -> None:
        self.guard_period_s = float(guard_period_s)
        self._lock = threading.Lock()
        self._t0: float | None = None

    def _read_counters(self) -> dict[str, float]:
        raise NotImplementedError

    def _ranges(self) -> dict[str, float | None]:
        return {}

    def _totals(self, counters: Mapping[str, float]) -> tuple[float, str]:
        """The total of per-counter joules, and what it is made of."""
        return sum(counters.values()), "total = sum of counters"

    def _accumulate(self) -> None:
        now = self._read_counters()
        ranges = self._ranges()
        with self._lock:
            for key, value in now.items():
                prev = self._last.get(key)
                if prev is None:
                    continue
                self._acc[key] = self._acc.get(key, 0.0) + counter_delta(prev, value, ranges.get(key))
            self._last = now
            self._reads += 1

    def _guard(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.guard_period_s):
                self._accumulate()
        except BaseException as err:  # surfaced by stop()
            self._guard_error = err

    def probe(self) -> str:
        counters = self._read_counters()
        return f"{len(counters)} counters ({', '.join(sorted(counters))})"

    def start(self) -> None:
        if self._t0 is not None:
            raise PowerError(f"{self.name} meter already started; call stop() before start()")
        self._last = self._read_counters()
        self._acc = {key: 0.0 for key in self._last}
        self._reads = 1
        self._guard_error: BaseException | None = None
        self._t0 = clock()
        self._stop_event = threading.Event()
        self._thread = threading.Thread(
            target=self._guard, args=(self._stop_event,), name=f"kdedge-{self.name}-guard", daemon=True
        )
        self._thread.start()

    def stop(self) -> EnergyReading:
        t1 = clock()
        if self._t0 is None:
            raise PowerError(f"{self.name} meter was not started; call start() first")
        self._stop_event.set()
        self._thread.join()
        t0, self._t0 = self._t0, None
        if self._guard_error is not None:
            raise self._guard_error
        self._accumulate()
        rails = dict(self._acc)
        joules, phrase = self._totals(rails)
        seconds = t1 - t0
        notes = [phrase, "energy counter"]
        if joules == 0.0:
            notes.append("the counter did not advance: the window is shorter than its update interval")
        return EnergyReading(
            joules=joules,
            mean_watts=joules / seconds if seconds > 0 else math.nan,
            seconds=seconds,
            samples=self._reads,
            period_s=None,
            source=self.name,
            rails=rails,
            note="; ".join(notes),
        )


def counter_delta(start: float, end: float, wrap: float | None) -> float:
    """Increase of a counter from ``start`` to ``end`` that wraps to zero after ``wrap``.

    One wrap at most is assumed between the two reads (the guard thread of
    :class:`CounterMeter` reads often enough for that to hold).

    Example:
        >>> counter_delta(90.0, 5.0, 100.0)   # 90 -> 100 wraps -> 5
        15.0
    """
    if end >= start:
        return end - start
    if not wrap:
        raise PowerError(
            f"energy counter went backwards ({start} -> {end}) and has no known wrap range; "
            "was the driver reloaded during the measurement?"
        )
    return end + (wrap - start)


def _unreadable(path: str, err: OSError, verb: str) -> PowerError:
    """The one-line error for a sysfs attribute that cannot be read (what to grant when it is permissions)."""
    if isinstance(err, PermissionError):
        return PowerPermissionError(f"cannot read {path}: permission denied. Run as root, or make it readable "
                                    f"(for example: sudo chmod o+r {path})")
    return PowerError(f"cannot {verb} {path}: {err.strerror or err}")


def read_number(path: str) -> float:
    """The first number in a sysfs attribute file; permission problems raise clearly."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError as err:
        raise _unreadable(path, err, "read") from None
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        raise PowerError(f"{path} does not hold a number (it holds {text.strip()[:40]!r})") from None


class AttributeReader:
    """Re-reads a sysfs attribute through a file descriptor kept open (``pread`` at offset 0).

    Opening a sysfs file costs more than reading it; a polling meter at 100 Hz reads several
    attributes per sample, so it keeps them open.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise _unreadable(path, err, "open") from None

    def read(self) -> float:
        try:
            raw = os.pread(self._fd, 64, 0)
        except OSError as err:
            raise PowerError(f"cannot read {self.path}: {err.strerror or err}") from None
        try:
            return float(raw.split()[0])
        except (IndexError, ValueError):
            raise PowerError(f"{self.path} does not hold a number (it holds {raw[:40]!r})") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
