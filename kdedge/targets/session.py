"""Stage sessions: the small interface a target's ``open`` returns so the runner can run its files.

A session runs one stage (or fused prefix) graph::

    session.run({"input": x}) -> {"stage0__logits": ..., "stage0__f0": ...}

keyed by the graph tensor names of the manifest (``input``, ``stageK__NAME``). It declares
what it can do as data: ``can_abort`` (a call can be cancelled from another thread: the
deadline policy's watchdog uses it) and ``can_bind`` (it can write its outputs into buffers the
runner preallocated, and read its inputs from them, without per-call allocation). Sessions
must allow concurrent ``run`` calls from several threads (onnxruntime's do); everything that
belongs to one call (abort handles, bound buffers) is created per call or per thread by the
runner. Every target opens its sessions through :meth:`kdedge.targets.base.Target.open_entry`.

numpy and the standard library only.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

__all__ = ["AbortHandle", "BoundCall", "Session", "StageAborted", "numpy_dtype"]


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


_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "uint8": np.uint8, "bool": np.bool_}


def numpy_dtype(name: str) -> Any:
    """numpy dtype of a manifest dtype name."""
    if name not in _NP_DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r}; known: {', '.join(_NP_DTYPES)}")
    return _NP_DTYPES[name]
