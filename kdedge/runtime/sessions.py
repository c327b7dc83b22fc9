"""Stage sessions: the small interface a target implements so the runner can run its stage files.

A session runs one stage (or fused prefix) graph::

    session.run({"input": x}) -> {"stage0__logits": ..., "stage0__f0": ...}

keyed by the graph tensor names of the manifest (``input``, ``stageK__NAME``). It declares
what it can do as data: ``can_abort`` (a call can be cancelled from another thread: the
deadline policy's watchdog uses it) and ``can_bind`` (it can write its outputs into buffers the
runner preallocated, and read its inputs from them, without per-call allocation). Sessions
must allow concurrent ``run`` calls from several threads (onnxruntime's do); everything that
belongs to one call (abort handles, bound buffers) is created per call or per thread by the
runner.

:class:`OrtSession` is the onnxruntime implementation. Other targets (TensorRT, CoreML, torch)
add theirs to :data:`SESSION_FACTORIES`.

Example:
    >>> s = OrtSession("model.kdedge/onnx/stage0.onnx", inputs=("input",),
    ...                outputs=("stage0__logits", "stage0__f0"), options=OrtOptions(threads=2))
    >>> outs = s.run({"input": x})
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "AbortHandle", "BoundCall", "OPTIMIZATION_LEVELS", "OrtOptions", "OrtSession", "SESSION_FACTORIES", "Session",
    "SessionFactory", "StageAborted", "THREADS_PER_CPU", "Watchdog", "check_threads", "default_threads",
    "get_session_factory", "max_threads", "open_ort_session",
]

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "layout", "all")


class StageAborted(RuntimeError):
    """A stage call was cancelled through its :class:`AbortHandle` (the deadline watchdog)."""


class AbortHandle:
    """The abort switch of one stage call.

    ``abort()`` may be called from any thread, also after the call ended (then it does nothing
    useful). ``deadline`` is the clock time at which the runner's watchdog fires, for sessions
    (and tests' fake sessions) that want to know it.
    """

    __slots__ = ("aborted", "deadline", "_on_abort")

    def __init__(self, on_abort: Callable[[], None] | None = None, deadline: float | None = None) -> None:
        self.aborted = False
        self.deadline = deadline
        self._on_abort = on_abort

    def abort(self) -> None:
        self.aborted = True
        if self._on_abort is not None:
            self._on_abort()


class BoundCall(Protocol):
    """A session call bound to preallocated buffers (see :meth:`Session.bind`)."""

    def set_input(self, name: str, array: np.ndarray) -> None:
        """Read input ``name`` from ``array`` (C-contiguous, the bound dtype and shape) from now on."""

    def __call__(self, abort: AbortHandle | None = None) -> None:
        """Run once: read the bound inputs, write the bound outputs."""


@runtime_checkable
class Session(Protocol):
    """One stage graph, opened for a target.

    Attributes:
        name: the graph name (``stage0``, ``prefix2``).
        inputs: graph tensor names it reads.
        outputs: graph tensor names it writes.
        can_abort: :meth:`abort_handle` returns a handle whose ``abort()`` cancels a running call.
        can_bind: :meth:`bind` is implemented.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    can_abort: bool
    can_bind: bool

    def run(self, inputs: Mapping[str, np.ndarray], abort: AbortHandle | None = None) -> dict[str, np.ndarray]:
        """Run once on ``inputs`` (tensor name -> array); return every output by tensor name.

        Raises:
            StageAborted: ``abort`` was triggered during the call.
        """

    def abort_handle(self) -> AbortHandle:
        """A fresh handle for one call (only when ``can_abort``)."""

    def bind(self, buffers: Mapping[str, np.ndarray]) -> BoundCall:
        """A call that reads its inputs from and writes its outputs into ``buffers`` (only when
        ``can_bind``). The returned object belongs to one thread."""

    def close(self) -> None:
        """Release the graph; the session is unusable afterwards."""


# (bundle, stage entry, options) -> Session. Options are target-specific.
SessionFactory = Callable[[Any, Any, Any], Session]

# target name -> "module:function" building a session for a stage entry; imported on first use
# so that a target whose runtime library is missing never breaks the others.
SESSION_FACTORIES: dict[str, str] = {
    "onnx": "kdedge.runtime.sessions:open_ort_session",
}


def get_session_factory(target: str) -> SessionFactory:
    """The session factory of ``target`` (see :data:`SESSION_FACTORIES`)."""
    if target not in SESSION_FACTORIES:
        from kdedge.targets import TARGETS, TEST_TARGETS, get_target  # the other targets (docs/targets.md)

        if target in TARGETS or target in TEST_TARGETS:
            return get_target(target).open_entry
        raise ValueError(f"the runtime cannot run target {target!r}; it runs: {', '.join([*SESSION_FACTORIES, *TARGETS])}")
    module, _, fn = SESSION_FACTORIES[target].partition(":")
    return getattr(importlib.import_module(module), fn)


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


# ---------------------------------------------------------------------------------------------
# onnxruntime


@dataclass(frozen=True)
class OrtOptions:
    """How onnxruntime sessions are created.

    Args:
        threads: intra-op threads per session (None: :func:`default_threads`).
        optimization: graph optimisation level, one of :data:`OPTIMIZATION_LEVELS`.
        providers: execution providers in order of preference (None: CPU).
        spinning: let idle intra-op threads spin between calls (lower latency between stages
            run back to back, more CPU burnt while idle).
        config: extra ``SessionOptions.add_session_config_entry`` pairs.
    """

    threads: int | None = None
    optimization: str = "all"
    providers: tuple[str, ...] | None = None
    spinning: bool = True
    config: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_threads(self.threads)
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown graph optimisation level {self.optimization!r}; "
                             f"known: {', '.join(OPTIMIZATION_LEVELS)}")

    @property
    def resolved_threads(self) -> int:
        return self.threads if self.threads is not None else default_threads()

    def session_options(self) -> Any:
        import onnxruntime as ort

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "layout": getattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT",
                                    ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[self.optimization]
        so.intra_op_num_threads = self.resolved_threads
        so.inter_op_num_threads = 1  # stages are sequential graphs; a second pool only adds threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if not self.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for k, v in self.config:
            so.add_session_config_entry(k, v)
        return so

    def resolved_providers(self) -> list[str]:
        import onnxruntime as ort

        wanted = list(self.providers or ("CPUExecutionProvider",))
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            hint = ", e.g. pip install onnxruntime-gpu" if "CUDAExecutionProvider" in missing else ""
            raise ValueError(f"onnxruntime provider(s) {missing} are not available here; available: "
                             f"{', '.join(available)} (install the onnxruntime build that has them{hint})")
        return wanted


_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "uint8": np.uint8, "bool": np.bool_}


class _OrtBound:
    """An onnxruntime IOBinding over preallocated numpy buffers (one thread's)."""

    __slots__ = ("_session", "_binding")

    def __init__(self, session: OrtSession, buffers: Mapping[str, np.ndarray]) -> None:
        self._session = session
        self._binding = session._sess.io_binding()
        for name in session.inputs:
            self._binding.bind_cpu_input(name, buffers[name])
        for name in session.outputs:
            a = buffers[name]
            if not a.flags.c_contiguous:
                raise ValueError(f"{session.name}: output buffer {name} must be C-contiguous")
            self._binding.bind_output(name, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)

    def set_input(self, name: str, array: np.ndarray) -> None:
        self._binding.bind_cpu_input(name, array)

    def __call__(self, abort: AbortHandle | None = None) -> None:
        ro = getattr(abort, "_run_options", None)
        try:
            self._session._sess.run_with_iobinding(self._binding, ro)
        except Exception as e:
            if abort is not None and abort.aborted:
                raise StageAborted(f"{self._session.name} was aborted") from None
            raise RuntimeError(f"onnxruntime failed running {self._session.name}: {e}") from None


class _OrtAbortHandle(AbortHandle):
    __slots__ = ("_run_options",)

    def __init__(self, run_options: Any) -> None:
        super().__init__(self._terminate)
        self._run_options = run_options

    def _terminate(self) -> None:
        # onnxruntime checks the flag between graph nodes and fails the call
        self._run_options.terminate = True


class OrtSession:
    """An onnxruntime session for one stage graph.

    Args:
        path: the ``.onnx`` file.
        inputs: graph tensor names the stage reads (checked against the file).
        outputs: graph tensor names it writes (checked against the file).
        name: graph name for messages (default: the file stem).
        options: :class:`OrtOptions`.

    Raises:
        ValueError: the file's inputs or outputs differ from the manifest's, or a provider is
            missing.
    """

    can_abort = True
    can_bind = True

    def __init__(self, path: str | Path, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None,
                 options: OrtOptions | None = None,
                 declared: Mapping[str, tuple[Sequence[int | None], str]] | None = None) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.path = Path(path)
        self.name = name or self.path.stem
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.options = options or OrtOptions()
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=self.options.session_options(),
                                              providers=self.options.resolved_providers())
        except ValueError:
            raise
        except Exception as e:  # onnxruntime raises its own classes for unreadable graphs
            raise ValueError(f"onnxruntime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        have_in = {i.name for i in self._sess.get_inputs()}
        have_out = {o.name for o in self._sess.get_outputs()}
        if set(self.inputs) != have_in or not set(self.outputs) <= have_out:
            raise ValueError(f"{self.path} has inputs {sorted(have_in)} and outputs {sorted(have_out)}; the manifest "
                             f"lists inputs {list(self.inputs)} and outputs {list(self.outputs)}; re-export the bundle")
        self._out_list = list(self.outputs)
        # outputs whose shape the graph leaves symbolic: checked after each run, never bound
        self._unchecked: dict[str, tuple[int | None, ...]] = {}
        if declared is not None:
            self._check_declared(declared)

    def _check_declared(self, declared: Mapping[str, tuple[Sequence[int | None], str]]) -> None:
        """The graph's declared inputs and outputs agree with the manifest's shapes and dtypes.

        A mismatch would otherwise surface as an onnxruntime error in the middle of a request,
        or as buffers of the wrong size bound to the graph. Dimensions the graph leaves symbolic
        cannot be checked here; such outputs are checked after every run instead, and the
        session does not bind buffers (``can_bind`` False)."""
        for kind, args in (("input", self._sess.get_inputs()), ("output", self._sess.get_outputs())):
            for a in args:
                if a.name not in declared:
                    continue
                shape, dtype = tuple(declared[a.name][0]), declared[a.name][1]
                graph_shape = list(a.shape) if a.shape is not None else None
                problem, symbolic = _graph_mismatch(graph_shape, a.type, shape, dtype)
                if problem is not None:
                    raise ValueError(f"{self.path}: {self.name}'s graph declares {kind} {a.name!r} as {problem}, the "
                                     f"manifest says {_shape_text(shape)} {dtype}; the manifest does not describe "
                                     "this graph (hand-edited?), re-export the bundle")
                if symbolic and kind == "output":
                    self._unchecked[a.name] = shape
        if self._unchecked:
            self.can_bind = False

    def run(self, inputs: Mapping[str, np.ndarray], abort: AbortHandle | None = None) -> dict[str, np.ndarray]:
        ro = getattr(abort, "_run_options", None)
        feeds = {k: inputs[k] for k in self.inputs}
        try:
            values = self._sess.run(self._out_list, feeds, ro)
        except Exception as e:
            if abort is not None and abort.aborted:
                raise StageAborted(f"{self.name} was aborted") from None
            raise RuntimeError(f"onnxruntime failed running {self.name}: {str(e).splitlines()[0]}") from None
        out = dict(zip(self.outputs, values))
        for name, shape in self._unchecked.items():
            got = out[name].shape
            if len(got) != len(shape) or any(d is not None and d != g for d, g in zip(shape[1:], got[1:])):
                raise ValueError(f"{self.path}: {self.name} returned {name} of shape {list(got)}, the manifest says "
                                 f"{_shape_text(shape)}; re-export the bundle")
        return out

    def abort_handle(self) -> AbortHandle:
        return _OrtAbortHandle(self._ort.RunOptions())

    def bind(self, buffers: Mapping[str, np.ndarray]) -> BoundCall:
        return _OrtBound(self, buffers)

    def close(self) -> None:
        self.__dict__.pop("_sess", None)


def open_ort_session(bundle: Any, entry: Any, options: OrtOptions | None) -> OrtSession:
    """The ``onnx`` target's factory: an :class:`OrtSession` for a bundle's stage entry, its graph
    checked against the entry's shapes and dtypes."""
    declared = {t.tensor: (t.shape, t.dtype) for t in (*entry.inputs, *entry.outputs)}
    return OrtSession(bundle.file(entry, "onnx"), [i.tensor for i in entry.inputs], [o.tensor for o in entry.outputs],
                      name=entry.name, options=options, declared=declared)


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "uint8": "tensor(uint8)", "bool": "tensor(bool)"}


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _graph_mismatch(graph_shape: list[Any] | None, graph_type: str, shape: Sequence[int | None],
                    dtype: str) -> tuple[str | None, bool]:
    """(how the graph declares a tensor, when that contradicts the manifest's ``shape`` and
    ``dtype``, else None; whether some dimension is symbolic and so could not be checked).

    onnxruntime gives each dimension as an int (fixed), a string (symbolic, e.g. ``batch``) or
    None. The batch dimension (the manifest's null) must not be fixed: every graph of a bundle
    takes any batch size."""
    text = f"{_shape_text(['?' if not isinstance(d, int) else d for d in graph_shape or ['?']])} {graph_type}"
    if _ORT_TYPES.get(dtype) != graph_type:
        return text, False
    if graph_shape is None:
        return None, True
    if len(graph_shape) != len(shape):
        return text, False
    symbolic = False
    for k, (g, m) in enumerate(zip(graph_shape, shape)):
        fixed = isinstance(g, int) and g >= 0
        if k == 0:
            if fixed and m is None:
                return f"{text} (a fixed batch size)", False
        elif not fixed or m is None:
            symbolic = True  # the graph (or the manifest) leaves it open: checked after each run
        elif g != m:
            return text, False
    return None, symbolic


def numpy_dtype(name: str) -> Any:
    """numpy dtype of a manifest dtype name."""
    if name not in _NP_DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r}; known: {', '.join(_NP_DTYPES)}")
    return _NP_DTYPES[name]


# ---------------------------------------------------------------------------------------------
# the watchdog


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
