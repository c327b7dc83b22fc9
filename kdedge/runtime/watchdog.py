"""The deadline watchdog: one background thread that aborts stage calls when their time is up."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable

from kdedge.targets.session import AbortHandle

__all__ = ["Watchdog"]


class Watchdog:
    """One background thread that aborts stage calls when their time is up.

    ``arm(when, handle)`` schedules ``handle.abort()`` at clock time ``when``; ``disarm`` cancels
    it once the call has returned. Arming costs a lock and a heap push; the thread starts on the
    first ``arm`` and sleeps on a condition variable in between. Thread-safe.

    Args:
        clock: the time source of ``when`` (``time.perf_counter``).
        thread_setup: called first in the watchdog's thread (the runner gives it real-time
            scheduling there).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 thread_setup: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._setup = thread_setup
        self._heap: list[list[Any]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, when: float, handle: AbortHandle) -> list[Any]:
        """Abort ``handle`` at clock time ``when`` unless disarmed before; returns the token."""
        token = [when, next(self._seq), handle, True]
        with self._cond:
            if self._closed:
                raise RuntimeError("the watchdog is closed")
            heapq.heappush(self._heap, token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kdedge-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0] is token:
                self._cond.notify()
        return token

    @staticmethod
    def disarm(token: list[Any]) -> None:
        token[3] = False  # removed lazily by the thread

    def _loop(self) -> None:
        if self._setup is not None:  # e.g. real-time scheduling for this thread
            try:
                self._setup()
            except OSError:
                pass  # the runner's own threads got the policy; the watchdog still works without
        with self._cond:
            while not self._closed:
                while self._heap and not self._heap[0][3]:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - self._clock()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                token = heapq.heappop(self._heap)
                if token[3]:
                    token[2].abort()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
