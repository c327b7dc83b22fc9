"""CPU thread counts of sessions: the default, the bound, the check (every target, every command)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["THREADS_PER_CPU", "check_threads", "default_threads", "max_threads", "usable_cpus"]


def default_threads() -> int:
    """CPU threads a session uses by default: one.

    Why not every CPU: each stage is its own onnxruntime session with its own intra-op pool, and
    a pool's threads spin for a while after its run, so while stage k+1 runs, stage k's threads
    still hold the cores. Measured on 2 cores (docs/runtime.md, "Threads"): the demo HNE's
    chain at 2 threads has a p99 of 10.5 ms against 0.84 ms at 1 thread, the paper-size CIFAR
    HNE's chain takes 31.8 ms against 8.8 ms (medians). One thread is never the worst choice on
    a shared machine; ``threads="auto"`` picks more per graph where the profiles show it pays
    (the CIFAR fused graph at 2 threads: 4.2 ms against 8.6 ms)."""
    return 1


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


THREADS_PER_CPU = 4  # the bound of every thread count: kdedge run, profile, Runner, OrtOptions


def max_threads() -> int:
    """The most intra-op threads a session may ask for: 4 x the machine's CPUs.

    More cannot run faster, and without a bound a typo such as ``--threads 100000`` spends
    minutes creating threads before anything runs (it looks like a hang)."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(threads: Any) -> int | None:
    """``threads`` as an int if it is None or from 1 to :func:`max_threads`; the one place the
    thread count of every session (any target) is checked.

    Raises:
        ValueError: not an integer, or out of range (one line with the bounds).
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ValueError(f"threads must be an integer, got {threads!r}")
    if not 1 <= threads <= max_threads():
        raise ValueError(f"threads must be an integer from 1 to {max_threads()} ({THREADS_PER_CPU} x the "
                         f"{os.cpu_count() or 1} CPUs of this machine), got {int(threads)}")
    return int(threads)
