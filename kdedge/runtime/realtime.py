"""Real-time execution for the runner: a real-time scheduling policy and optional CPU affinity
for every thread that runs a request, memory locked, and the garbage collector kept out of
requests. Linux only; stdlib only.

Why: on a device that runs anything else, the time-sharing scheduler decides the tail latency
of a request, not the model: a stage whose median is 0.1 ms waits milliseconds for a CPU now and
then (docs/runtime.md measures it). Under ``SCHED_FIFO`` a runnable request thread takes the
CPU from every ordinary thread at once and keeps it until it blocks.

Which threads: the thread that calls the runner, and onnxruntime's intra-op threads. Those are
created when a session is created (one pool per session) and, with glibc's default
``PTHREAD_INHERIT_SCHED``, take the policy and affinity of the thread that creates them; kdedge
does not rely on that: :class:`ThreadAdopter` lists the process's threads (``/proc/self/task``)
before sessions open and sets the policy on every thread that appeared, then reads every policy
back from ``/proc`` and refuses to go on if one thread escaped.

CPU wake-up latency: a CPU that has nothing to run goes idle, and the deeper its idle state the
longer it takes to wake when a request arrives (on a virtual machine an idle vCPU may even be
handed back to the host). With ``--realtime --cpu-latency US`` the runner asks the kernel's PM
QoS interface (``/dev/cpu_dma_latency``) for a wake-up latency of at most ``US`` microseconds (0:
idle CPUs poll instead of sleeping) for as long as it is open, as ``cyclictest`` and tuned's
``latency-performance`` profile do. It costs idle power and is off by default: on the machines
measured it trimmed the tail of requests after idle time a little and changed no miss rate
(docs/runtime.md).

Where the OS refuses (no ``CAP_SYS_NICE``, ``RLIMIT_RTPRIO`` 0 for a user, a container without
the capability, not Linux), :class:`RealtimeError` says in one line what to grant; there is no
silent fallback to ordinary scheduling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import os
import resource
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from kdedge.bundle.profile.store import realtime_key as _key
from kdedge.bundle.profile.store import split_realtime_key  # noqa: F401 - public here too

POLICIES = {"fifo": "SCHED_FIFO", "rr": "SCHED_RR"}
DEFAULT_PRIORITY = 50   # as `chrt -f 50`; the kernel's threaded IRQ handlers also run at 50
MAX_PRIORITY = 98       # 99 is the kernel's watchdog/migration threads' level; never take it

# /proc/<pid>/task/<tid>/stat policy numbers (include/uapi/linux/sched.h)
_POLICY_NUMBERS = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
                   6: "SCHED_DEADLINE"}
_MCL_CURRENT, _MCL_FUTURE = 1, 2
CPU_LATENCY_DEVICE = "/dev/cpu_dma_latency"  # Linux PM QoS: the system-wide CPU wake-up latency limit
_MAX_CPU_LATENCY_US = 2_000_000_000         # the kernel's "no limit" (PM_QOS_DEFAULT_VALUE)


class RealtimeError(PermissionError):
    """The OS does not allow what a real-time request needs; the message says what to grant."""


GRANT = ("run as root, or grant the capability (sudo setcap cap_sys_nice+ep $(readlink -f $(which python3))), "
         "or raise the limit (ulimit -r 99; /etc/security/limits.conf '<user> - rtprio 99'; systemd "
         "CPUSchedulingPolicy=fifo, LimitRTPRIO=99); in a container add --cap-add=SYS_NICE")


@dataclass(frozen=True)
class Realtime:
    """How the runner runs in real time (``Runner(realtime=...)``, ``kdedge run --realtime``).

    Args:
        priority: real-time priority, 1..98 (higher runs first).
        policy: ``fifo`` (``SCHED_FIFO``: run until blocking) or ``rr`` (round robin among
            threads of equal priority).
        cpus: CPUs the request threads may run on (None: leave affinity as it is).
        lock_memory: ``mlockall`` so that no page of the process is swapped or faulted in
            during a request (refused: an error, unless ``lock_memory`` is False).
        freeze_gc: move everything allocated before the first request into the permanent
            generation (``gc.freeze``) and keep collections out of requests.
        cpu_latency_us: while the runner is open, ask the kernel (``/dev/cpu_dma_latency``)
            to keep idle CPUs able to wake within this many microseconds (0: they poll; None,
            the default: leave the limit alone). Refused: an error that says what to grant.

    Like the CPU set, memory locking and gc, ``cpu_latency_us`` is not part of the profile key:
    it trims the tail, it does not change what a stage costs.
    """

    priority: int = DEFAULT_PRIORITY
    policy: str = "fifo"
    cpus: tuple[int, ...] | None = None
    lock_memory: bool = True
    freeze_gc: bool = True
    cpu_latency_us: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown real-time policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or \
                not 1 <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"real-time priority must be an integer in 1..{MAX_PRIORITY}, got {self.priority!r}")
        if self.cpus is not None:
            check_cpus(self.cpus)
        us = self.cpu_latency_us
        if us is not None and (isinstance(us, bool) or not isinstance(us, int) or not 0 <= us < _MAX_CPU_LATENCY_US):
            raise ValueError(f"the CPU wake-up latency must be an integer number of microseconds >= 0 (or off), got {us!r}")

    @property
    def policy_name(self) -> str:
        return POLICIES[self.policy]

    def key(self) -> str:
        """The profile key part: ``rt`` + policy + priority (``rtfifo50``); CPUs are not part of it."""
        return f"rt{self.policy}{self.priority}"

    def to_dict(self) -> dict[str, object]:
        return {"policy": self.policy_name, "priority": self.priority,
                "cpus": list(self.cpus) if self.cpus is not None else None,
                "lock_memory": self.lock_memory, "freeze_gc": self.freeze_gc, "cpu_latency_us": self.cpu_latency_us}


def parse_cpu_latency(text: str) -> int | None:
    """``--cpu-latency``: ``off`` -> None, ``0`` / ``50`` -> microseconds; one-line error otherwise."""
    t = text.strip().lower()
    if t in ("off", "none"):
        return None
    try:
        us = int(t)
    except ValueError:
        us = -1
    if not 0 <= us < _MAX_CPU_LATENCY_US:
        raise ValueError(f"--cpu-latency takes microseconds >= 0 or off, got {text!r}")
    return us


def realtime_key(base: str, cfg: Realtime | None) -> str:
    """A runner's profile key: the target's run key plus the real-time part of ``cfg``
    (:func:`kdedge.bundle.profile.store.realtime_key`)."""
    return _key(base, None if cfg is None else cfg.key())


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0,1"`` or ``"0-3,6"`` -> (0, 1) / (0, 1, 2, 3, 6); one-line error on anything else,
    and on a CPU this process may not run on (found before a range is expanded: ``0-100000000``
    is refused at once)."""
    out: list[int] = []
    top = max(usable_cpus(), default=0)
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not all(p.strip().isascii() and p.strip().isdigit() for p in ((lo, hi) if sep else (lo,))):
            raise ValueError(f"--cpus takes CPU numbers like 0,1 or 0-3, got {text!r}")
        a = int(lo)
        b = int(hi) if sep else a
        if b < a:
            raise ValueError(f"--cpus takes CPU numbers like 0,1 or 0-3, got {text!r}")
        if b > top:
            check_cpus((b,))  # the one-line error naming the usable CPUs
        out.extend(range(a, b + 1))
    return check_cpus(tuple(sorted(set(out))))


def check_cpus(cpus: Sequence[int]) -> tuple[int, ...]:
    cpus = tuple(cpus)
    if not cpus:
        raise ValueError("the CPU set is empty")
    allowed = usable_cpus()
    bad = [c for c in cpus if isinstance(c, bool) or not isinstance(c, int) or c not in allowed]
    if bad:
        raise ValueError(f"CPU {bad[0]} is not one this process may run on; usable: "
                         f"{','.join(map(str, sorted(allowed)))}")
    return cpus


def usable_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def supported() -> str | None:
    """None where real-time scheduling can be asked for here; else why not."""
    if not sys.platform.startswith("linux"):
        return f"real-time scheduling is implemented for Linux only (this is {sys.platform})"
    if not hasattr(os, "sched_setscheduler"):
        return "this Python has no os.sched_setscheduler"
    return None


def _refusal(what: str, e: OSError, cfg: Realtime | None = None) -> RealtimeError:
    limit = resource.getrlimit(resource.RLIMIT_RTPRIO)[0] if hasattr(resource, "RLIMIT_RTPRIO") else None
    prio = f" at priority {cfg.priority}" if cfg is not None else ""
    lim = f" (RLIMIT_RTPRIO is {limit})" if limit is not None and limit != resource.RLIM_INFINITY else ""
    return RealtimeError(f"the OS refused {what}{prio}{lim}: {os.strerror(e.errno or errno.EPERM)}; {GRANT}")


def thread_ids() -> list[int]:
    """The ids of this process's threads (Linux: the entries of /proc/self/task)."""
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return [threading.get_native_id()]


def thread_policy(tid: int) -> tuple[str, int]:
    """(policy name, real-time priority) of a thread of this process, read from /proc: what
    the kernel applies, not what a library says it asked for."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    # after the name: field 3 is fields[0]; rt_priority is field 40, policy field 41
    return _POLICY_NUMBERS.get(int(fields[38]), f"policy {fields[38]}"), int(fields[37])


def thread_cpus(tid: int) -> set[int]:
    return set(os.sched_getaffinity(tid))


def set_thread(tid: int, cfg: Realtime) -> None:
    """Give thread ``tid`` (0: the calling thread) ``cfg``'s policy, priority and CPUs."""
    policy = os.SCHED_FIFO if cfg.policy == "fifo" else os.SCHED_RR
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(cfg.priority))
    except PermissionError as e:
        raise _refusal(f"{cfg.policy_name}", e, cfg) from None
    except OSError as e:
        if e.errno == errno.ESRCH:  # the thread ended meanwhile
            return
        raise _refusal(f"{cfg.policy_name}", e, cfg) from None
    if cfg.cpus is not None:
        try:
            os.sched_setaffinity(tid, cfg.cpus)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise RealtimeError(f"cannot pin thread {tid} to CPUs {list(cfg.cpus)}: {e.strerror}") from None


def set_normal(tid: int = 0) -> None:
    """Back to ordinary time sharing (``SCHED_OTHER``), which needs no privilege."""
    try:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass


def lock_memory() -> None:
    """``mlockall(MCL_CURRENT | MCL_FUTURE)``: no page fault to disk during a request."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        raise RealtimeError(f"the OS refused to lock memory (mlockall: {os.strerror(err)}; RLIMIT_MEMLOCK is "
                            f"{'unlimited' if limit == resource.RLIM_INFINITY else f'{limit} bytes'}); run as root, "
                            "raise it (ulimit -l unlimited; systemd LimitMEMLOCK=infinity), or run without "
                            "memory locking (--no-mlock)")


def unlock_memory() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.munlockall()


class CpuLatencyHold:
    """A request to the kernel's PM QoS: idle CPUs wake within ``us`` microseconds, for as long
    as this object is open (the kernel drops the request when the file is closed, also when the
    process dies). Several holds may coexist; the kernel applies the smallest.

    Example::

        with CpuLatencyHold(0):    # what Runner(realtime=Realtime(cpu_latency_us=0)) does while open
            ...
    """

    def __init__(self, us: int = 0, device: str | None = None) -> None:
        device = CPU_LATENCY_DEVICE if device is None else device
        self.us, self.device = us, device
        self._fd: int | None = None
        try:
            self._fd = os.open(device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise RealtimeError(f"cannot limit the CPU wake-up latency: {device} does not exist (a kernel without "
                                "PM QoS, or a container without the device: docker --device "
                                f"{device}); or run without --cpu-latency") from None
        except OSError as e:
            raise RealtimeError(f"cannot limit the CPU wake-up latency: opening {device} was refused "
                                f"({os.strerror(e.errno or errno.EACCES)}; only root may write it): run as root, "
                                "let the service's group write it (a udev rule), or run without --cpu-latency") from None
        try:
            os.write(self._fd, struct.pack("i", us))
        except OSError as e:
            self.close()
            raise RealtimeError(f"cannot limit the CPU wake-up latency: writing {us} to {device} failed "
                                f"({os.strerror(e.errno or errno.EINVAL)}); run without --cpu-latency") from None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "CpuLatencyHold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def cpu_latency_limit(device: str | None = None) -> int | None:
    """The system-wide CPU wake-up latency limit in force now (µs; 2000000000: none), or None
    where it cannot be read."""
    device = CPU_LATENCY_DEVICE if device is None else device
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4)
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("i", raw)[0] if len(raw) == 4 else None


@dataclass
class ThreadAdopter:
    """Give real-time scheduling to the threads that sessions create.

    Usage: ``adopter = ThreadAdopter(cfg)`` before sessions open (it records the threads that
    exist), then ``adopter.adopt()`` after: every thread that appeared gets the policy, and
    :meth:`check` reads each back from /proc.
    """

    cfg: Realtime
    before: set[int] = field(default_factory=lambda: set(thread_ids()))
    adopted: list[int] = field(default_factory=list)

    def new_threads(self) -> list[int]:
        return [t for t in thread_ids() if t not in self.before]

    def adopt(self) -> list[int]:
        for tid in self.new_threads():
            set_thread(tid, self.cfg)
            self.adopted.append(tid)
        return self.adopted

    def check(self, tids: Sequence[int]) -> None:
        for tid in tids:
            try:
                name, prio = thread_policy(tid)
            except OSError:  # ended
                continue
            if name != self.cfg.policy_name or prio != self.cfg.priority:
                raise RealtimeError(f"thread {tid} runs {name} priority {prio} after being set to "
                                    f"{self.cfg.policy_name} {self.cfg.priority}")


class GcGuard:
    """Keep the cyclic garbage collector out of requests.

    ``freeze()`` once after warm-up moves every object alive then into the permanent generation
    (no collection scans them again); ``enter()``/``leave()`` around a request disable automatic
    collection inside it. Collections that came due during a request happen at the first
    allocation after ``leave()``, i.e. between requests.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._was_enabled = False
        self.frozen = False

    def freeze(self) -> None:
        gc.collect()
        gc.freeze()
        self.frozen = True

    def enter(self) -> None:
        if self._depth == 0:
            self._was_enabled = gc.isenabled()
            gc.disable()
        self._depth += 1

    def leave(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._was_enabled:
            gc.enable()


def describe_threads(tids: Sequence[int] | None = None) -> Iterator[tuple[int, str, int, list[int]]]:
    """(tid, policy, priority, CPUs) of each thread: what ``kdedge run --realtime`` reports."""
    for tid in tids if tids is not None else thread_ids():
        try:
            name, prio = thread_policy(tid)
            cpus = sorted(thread_cpus(tid))
        except OSError:
            continue
        yield tid, name, prio, cpus
