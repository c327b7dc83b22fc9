"""The onnxruntime session: :class:`OrtOptions` (how sessions are created) and :class:`OrtSession`
(one stage graph; IOBinding over the runner's buffers, cancellable runs, the graph checked
against the manifest when it opens). onnxruntime is imported when a session is created.

Example:
    >>> s = OrtSession("model.kdedge/onnx/stage0.onnx", inputs=("input",),
    ...                outputs=("stage0__logits", "stage0__f0"), options=OrtOptions(threads=2))
    >>> outs = s.run({"input": x})
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdedge.targets.session import AbortHandle, BoundCall, StageAborted
from kdedge.targets.threads import check_threads, default_threads

__all__ = ["OPTIMIZATION_LEVELS", "OrtOptions", "OrtSession", "open_ort_session", "shared_pool"]

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "layout", "all")


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
        shared_pool: every session of this process runs on one onnxruntime intra-op pool of
            ``threads`` threads (:func:`shared_pool`) instead of a pool per session. Consecutive
            stages then do not spin against each other's idle threads (docs/runtime.md,
            "Threads"); onnxruntime allows it only for every session of a process at once.
    """

    threads: int | None = None
    optimization: str = "all"
    providers: tuple[str, ...] | None = None
    spinning: bool = True
    config: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    shared_pool: bool = False

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
        if self.shared_pool:
            shared_pool(self.resolved_threads)
            so.use_per_session_threads = False
        else:
            if _SHARED["threads"] is not None:
                raise ValueError(f"this process runs onnxruntime sessions on a shared pool of {_SHARED['threads']} "
                                 "thread(s), and onnxruntime then refuses sessions with pools of their own; open "
                                 "every session with shared_pool=True (kdedge run/profile --shared-pool)")
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


_SHARED: dict[str, int | None] = {"threads": None}
_SHARED_LOCK = threading.Lock()


def shared_pool(threads: int) -> int:
    """Create this process's one onnxruntime intra-op pool of ``threads`` threads (once), for
    sessions with ``OrtOptions(shared_pool=True)``; returns its size.

    Threads created by onnxruntime for it inherit the scheduling policy of the thread that
    creates the first shared-pool session (what ``Runner(realtime=...)`` relies on).

    Raises:
        ValueError: the process's pool already has another size (onnxruntime has one per process).
    """
    import onnxruntime as ort

    with _SHARED_LOCK:
        if _SHARED["threads"] is None:
            ort.set_global_thread_pool_sizes(int(threads), 1)
            _SHARED["threads"] = int(threads)
        elif _SHARED["threads"] != int(threads):
            raise ValueError(f"this process's shared onnxruntime pool has {_SHARED['threads']} thread(s), asked for "
                             f"{threads}; onnxruntime keeps one pool per process: use one thread count per process")
        return int(_SHARED["threads"])


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
        model: the graph's bytes to load instead of ``path`` (still named by it in messages).
        optimised_to: where onnxruntime writes the graph as it optimised it (for
            :mod:`kdedge.targets.ort_blocked`).

    Raises:
        ValueError: the file's inputs or outputs differ from the manifest's, or a provider is
            missing.
    """

    can_abort = True
    can_bind = True
    blocked: tuple[str, ...] = ()  # carried tensors it exchanges in onnxruntime's blocked layout

    def __init__(self, path: str | Path, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None,
                 options: OrtOptions | None = None,
                 declared: Mapping[str, tuple[Sequence[int | None], str]] | None = None,
                 model: bytes | None = None, optimised_to: str | Path | None = None) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.path = Path(path)
        self.name = name or self.path.stem
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.options = options or OrtOptions()
        so = self.options.session_options()
        if optimised_to is not None:
            so.optimized_model_filepath = str(optimised_to)
        try:
            self._sess = ort.InferenceSession(str(self.path) if model is None else model, sess_options=so,
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
    """An :class:`OrtSession` for a bundle's stage entry (the ``onnx`` target's ``open_entry``)."""
    from kdedge.targets import get_target

    return get_target("onnx").open_entry(bundle, entry, options)


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
