"""An emulated TensorRT (10 or 11) and CUDA runtime (cuda-python) that execute, for tests.

TensorRT cannot be installed on this project's machines and they have no GPU, so the tensorrt
target's builder, calibrator and sessions are driven through these fakes. They implement the
subset of the two Python APIs that :mod:`kdedge.targets.tensorrt` calls, with the semantics the
documentation gives, strictly enough that misuse fails loudly:

- :class:`FakeCudart` keeps *device memory* as separate buffers keyed by device address, in an
  address range no host pointer can have (from ``1 << 56``): a host pointer passed as a device
  address, a device address read as a host pointer, a copy past an allocation, a use after
  ``cudaFree`` or a double free raises :class:`EmulationError` (a real GPU would crash or read
  garbage). Freed addresses are never handed out again, so a stale pointer is always caught.
- Streams are queues: work enqueued on a stream (``cudaMemcpyAsync`` host-to-device or
  device-to-device, ``execute_async_v3``, ``cudaGraphLaunch``) runs when the stream is
  synchronized, when a synchronous call (``cudaMemcpy``, ``cudaFree``) synchronizes the device, or
  when a device-to-host ``cudaMemcpyAsync`` into pageable memory needs it (CUDA returns from that
  one only once the copy is done). Code that reads a result before its stream ran gets stale
  data; code that crosses streams without synchronizing reads before the producer wrote.
- Stream capture records the enqueued work instead of running it; ``cudaGraphInstantiate`` and
  ``cudaGraphLaunch`` replay exactly what was captured, *with the addresses and shapes bound at
  capture time* (as TensorRT's captured kernels do): a graph replayed after its buffers changed
  computes on stale data. Calls that CUDA forbids during a capture (``cudaMalloc``,
  ``cudaMemcpy``, ``cudaFree``, synchronizing the capturing stream) return
  ``cudaErrorStreamCaptureUnsupported`` and invalidate it, from every thread for a
  ``Global``-mode capture and from the capturing thread only for ``ThreadLocal``.
- Every host<->device copy is counted (:attr:`FakeCudart.counts`), so a test can assert that
  carried tensors never visit the host.
- The fake builder serializes an "engine" that carries the ONNX bytes, the I/O tensors, the
  optimisation profile, the flags and whether it was strongly typed or calibrated; the fake
  runtime deserializes it (refusing another TensorRT version, as TensorRT does), and its
  execution context follows TensorRT's rules: input shapes must lie in the profile
  (``set_input_shape`` returns False otherwise), output shapes are -1 until every input shape is
  set, every I/O tensor needs an address before ``execute_async_v3``, which runs the ONNX graph
  with onnxruntime on the bytes at the bound device addresses. An FP16-flag engine rounds its
  outputs through float16.

What this proves: the orchestration (buffers, addresses, copies, streams, graphs, lifetimes,
threads) of the real session code. What it does not: TensorRT's numerics, or that the real
bindings take these exact argument types (the cudart subset is checked against the names and
arities of an installed ``cuda.bindings`` where there is one).
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import threading
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["EmulationError", "FakeCudart", "HERE", "fake_tensorrt", "install"]

DEVICE_BASE = 1 << 56  # device addresses: far above any user-space host address
CAPTURE_UNSUPPORTED = 900  # cudaErrorStreamCaptureUnsupported
CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated
INVALID_VALUE = 1  # cudaErrorInvalidValue
ENGINE_MAGIC = b"FAKETRT\n"

# what FakeCudart reports (device_facts() on the emulated device)
HERE = {"tensorrt": "10.13.0.35", "cuda": "12.9", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "jetson_l4t": None, "jetson_board": None}

_ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 3: "int8", 2: "uint8", 9: "bool"}


class EmulationError(AssertionError):
    """The code under test misused the emulated CUDA or TensorRT API (on a GPU: a crash, an
    illegal memory access, or silently wrong results)."""


class _Stream:
    """A ``cudaStream_t``: ``int()`` gives its handle, as cuda-python's does."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.pending: list[Callable[[], None]] = []
        self.capture: list[Callable[[], None]] | None = None
        self.capture_mode = 0
        self.capture_thread: int | None = None
        self.capture_invalid = False
        self.destroyed = False

    def __int__(self) -> int:
        return self.handle

    def __repr__(self) -> str:
        return f"<cudaStream_t {self.handle:#x}>"


class _Graph:
    def __init__(self, ops: list[Callable[[], None]]) -> None:
        self.ops, self.destroyed = ops, False


class _GraphExec:
    def __init__(self, ops: list[Callable[[], None]]) -> None:
        self.ops, self.destroyed, self.launches = ops, False, 0


class FakeCudart:
    """cuda-python's runtime module (``cuda.bindings.runtime``) over emulated device memory.

    Attributes:
        buffers: every allocation ever made, device address -> its bytes (uint8 array).
        live: the allocations not yet freed.
        mallocs: the size of each ``cudaMalloc``, in order; freed: addresses freed, in order.
        copies: ``(kind, dst, src, nbytes)`` of every copy, in order.
        counts: ``h2d``, ``d2h``, ``d2d`` copies; ``graphs_instantiated``, ``graph_launches``,
            ``graph_execs_destroyed``, ``graphs_destroyed``, ``streams_created``,
            ``streams_destroyed``.
        streams: every stream created.
    """

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3
        cudaMemcpyDefault = 4

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    def __init__(self, gpu: str = HERE["gpu"], capability: tuple[int, int] = (9, 0), runtime: int = 12090) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.live: dict[int, np.ndarray] = {}
        self.mallocs: list[int] = []
        self.freed: list[int] = []
        self.copies: list[tuple[int, int, int, int]] = []
        self.counts = dict.fromkeys(("h2d", "d2h", "d2d", "graphs_instantiated", "graph_launches",
                                     "graph_execs_destroyed", "graphs_destroyed", "streams_created",
                                     "streams_destroyed"), 0)
        self.streams: list[_Stream] = []
        self.graph_execs: list[_GraphExec] = []
        self._next = DEVICE_BASE
        self._lock = threading.RLock()  # the emulated GPU runs one thing at a time
        self._gpu, self._cap, self._runtime = gpu, capability, runtime

    # -- facts ------------------------------------------------------------------------------------
    def cudaRuntimeGetVersion(self) -> tuple[int, int]:  # noqa: N802
        return 0, self._runtime

    def cudaGetDevice(self) -> tuple[int, int]:  # noqa: N802
        return 0, 0

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:  # noqa: N802
        if device != 0:
            return INVALID_VALUE, None
        return 0, types.SimpleNamespace(name=self._gpu.encode() + b"\x00" * 8, major=self._cap[0], minor=self._cap[1])

    # -- address spaces ---------------------------------------------------------------------------
    def _device(self, ptr: Any, n: int, what: str) -> np.ndarray:
        """The bytes [ptr, ptr + n) of a live allocation (a writable view)."""
        if not isinstance(ptr, (int, np.integer)):
            raise EmulationError(f"{what}: device address {ptr!r} is not an int")
        ptr = int(ptr)
        if ptr < DEVICE_BASE:
            raise EmulationError(f"{what}: {ptr:#x} is a host address, not a device allocation")
        for base, buf in self.buffers.items():
            if base <= ptr < base + max(len(buf), 1):
                if base not in self.live:
                    raise EmulationError(f"{what}: {ptr:#x} lies in an allocation that was freed (use after free)")
                off = ptr - base
                if off + n > len(buf):
                    raise EmulationError(f"{what}: {n} bytes at {ptr:#x} run past the end of its allocation "
                                         f"({len(buf)} bytes)")
                return buf[off:off + n]
        raise EmulationError(f"{what}: {ptr:#x} is no device allocation")

    @staticmethod
    def _host(ptr: Any, what: str) -> int:
        if not isinstance(ptr, (int, np.integer)):
            raise EmulationError(f"{what}: host pointer {ptr!r} is not an int")
        if int(ptr) >= DEVICE_BASE or int(ptr) == 0:
            raise EmulationError(f"{what}: {int(ptr):#x} is a device address (or null), not host memory")
        return int(ptr)

    def read(self, ptr: int, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A copy of device memory as an array (for tests; counts as no copy)."""
        dt = np.dtype(dtype)
        with self._lock:
            n = int(np.prod(shape)) * dt.itemsize
            return np.frombuffer(self._device(ptr, n, "read").tobytes(), dt).reshape(shape)

    def write(self, ptr: int, array: np.ndarray) -> None:
        """Write device memory directly (for the emulated engine and tests; counts as no copy)."""
        a = np.ascontiguousarray(array)
        self._device(ptr, a.nbytes, "write")[:] = np.frombuffer(a.tobytes(), np.uint8)

    # -- capture rules ----------------------------------------------------------------------------
    def _unsafe(self, what: str) -> int:
        """0, or the error of a call CUDA forbids while a stream captures (which invalidates it)."""
        me = threading.get_ident()
        for s in self.streams:
            if s.capture is None:
                continue
            if s.capture_mode == self.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed:
                continue
            if (s.capture_mode == self.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
                    or s.capture_thread == me):
                s.capture_invalid = True
                return CAPTURE_UNSUPPORTED
        return 0

    def _stream(self, stream: Any, what: str) -> _Stream | None:
        if stream is None or (isinstance(stream, int) and stream == 0):
            return None  # the legacy default stream
        if isinstance(stream, _Stream):
            s = stream
        else:
            s = next((x for x in self.streams if x.handle == int(stream)), None)
            if s is None:
                raise EmulationError(f"{what}: {stream!r} is no stream of this device")
        if s.destroyed:
            raise EmulationError(f"{what}: stream {s!r} was destroyed")
        return s

    def _enqueue(self, s: _Stream | None, op: Callable[[], None]) -> None:
        if s is None:  # the legacy default stream synchronizes with every (blocking) stream
            self._flush_all()
            op()
        elif s.capture is not None:
            s.capture.append(op)
        else:
            s.pending.append(op)

    def _flush(self, s: _Stream) -> None:
        while s.pending:
            s.pending.pop(0)()

    def _flush_all(self) -> None:
        for s in self.streams:
            if s.capture is None:
                self._flush(s)

    # -- memory -----------------------------------------------------------------------------------
    def cudaMalloc(self, size: int) -> tuple[int, int | None]:  # noqa: N802
        with self._lock:
            if (err := self._unsafe("cudaMalloc")) != 0:
                return err, None
            size = int(size)
            if size < 0:
                return INVALID_VALUE, None
            ptr = self._next
            self._next += (max(size, 1) + 255) // 256 * 256 + 256  # a gap: an overrun never lands in a neighbour
            buf = np.zeros(size, np.uint8)
            self.buffers[ptr] = self.live[ptr] = buf
            self.mallocs.append(size)
            return 0, ptr

    def cudaFree(self, ptr: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            if (err := self._unsafe("cudaFree")) != 0:
                return (err,)
            ptr = int(ptr)
            if ptr not in self.buffers:
                raise EmulationError(f"cudaFree: {ptr:#x} is no device allocation")
            if ptr not in self.live:
                raise EmulationError(f"cudaFree: {ptr:#x} freed twice")
            self._flush_all()  # cudaFree synchronizes the device
            del self.live[ptr]
            self.freed.append(ptr)
            return (0,)

    def _copy(self, dst: Any, src: Any, n: int, kind: int, what: str) -> Callable[[], None]:
        """Check a copy now; the returned callable does the device side of it."""
        K = self.cudaMemcpyKind
        n = int(n)
        if kind == K.cudaMemcpyHostToDevice:
            data = ctypes.string_at(self._host(src, what), n)  # pageable: staged when the call returns
            self._device(dst, n, what)
            self.counts["h2d"] += 1

            def op() -> None:
                self._device(dst, n, what)[:] = np.frombuffer(data, np.uint8)
        elif kind == K.cudaMemcpyDeviceToHost:
            host = self._host(dst, what)
            self._device(src, n, what)
            self.counts["d2h"] += 1

            def op() -> None:
                ctypes.memmove(host, self._device(src, n, what).ctypes.data, n)
        elif kind == K.cudaMemcpyDeviceToDevice:
            self._device(src, n, what)
            self._device(dst, n, what)
            self.counts["d2d"] += 1

            def op() -> None:
                self._device(dst, n, what)[:] = self._device(src, n, what).copy()
        else:
            raise EmulationError(f"{what}: copy kind {kind!r} is not emulated (give the direction)")
        self.copies.append((int(kind), int(dst), int(src), n))
        return op

    def cudaMemcpy(self, dst: Any, src: Any, count: int, kind: int) -> tuple[int]:  # noqa: N802
        with self._lock:
            if (err := self._unsafe("cudaMemcpy")) != 0:
                return (err,)
            op = self._copy(dst, src, count, kind, "cudaMemcpy")
            self._flush_all()  # synchronous copies run on the legacy default stream
            op()
            return (0,)

    def cudaMemcpyAsync(self, dst: Any, src: Any, count: int, kind: int, stream: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            s = self._stream(stream, "cudaMemcpyAsync")
            if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost and s is not None and s.capture is not None:
                s.capture_invalid = True  # a copy into pageable memory cannot be captured
                return (CAPTURE_UNSUPPORTED,)
            op = self._copy(dst, src, count, kind, "cudaMemcpyAsync")
            self._enqueue(s, op)
            if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost and s is not None:
                self._flush(s)  # into pageable host memory: returns once the copy is done
            return (0,)

    # -- streams and graphs -----------------------------------------------------------------------
    def cudaStreamCreate(self) -> tuple[int, _Stream]:  # noqa: N802
        with self._lock:
            s = _Stream(DEVICE_BASE // 2 + 16 * (len(self.streams) + 1))
            self.streams.append(s)
            self.counts["streams_created"] += 1
            return 0, s

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            s = self._stream(stream, "cudaStreamDestroy")
            if s is None:
                return (INVALID_VALUE,)
            self._flush(s)  # work already enqueued completes
            s.destroyed = True
            self.counts["streams_destroyed"] += 1
            return (0,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            s = self._stream(stream, "cudaStreamSynchronize")
            if s is None:
                self._flush_all()
                return (0,)
            if s.capture is not None:
                s.capture_invalid = True
                return (CAPTURE_UNSUPPORTED,)
            self._flush(s)
            return (0,)

    def cudaStreamBeginCapture(self, stream: Any, mode: int) -> tuple[int]:  # noqa: N802
        with self._lock:
            s = self._stream(stream, "cudaStreamBeginCapture")
            if s is None or s.capture is not None:
                return (INVALID_VALUE,)
            self._flush(s)  # emulation: what was enqueued before the capture is not part of it
            s.capture, s.capture_mode, s.capture_thread, s.capture_invalid = [], int(mode), threading.get_ident(), False
            return (0,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[int, _Graph | None]:  # noqa: N802
        with self._lock:
            s = self._stream(stream, "cudaStreamEndCapture")
            if s is None or s.capture is None:
                return INVALID_VALUE, None
            ops, bad = s.capture, s.capture_invalid
            s.capture, s.capture_thread, s.capture_invalid = None, None, False
            if bad:
                return CAPTURE_INVALIDATED, None
            return 0, _Graph(ops)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[int, _GraphExec | None]:  # noqa: N802
        with self._lock:
            if not isinstance(graph, _Graph) or graph.destroyed:
                return INVALID_VALUE, None
            g = _GraphExec(list(graph.ops))
            self.graph_execs.append(g)
            self.counts["graphs_instantiated"] += 1
            return 0, g

    def cudaGraphDestroy(self, graph: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            if not isinstance(graph, _Graph) or graph.destroyed:
                raise EmulationError(f"cudaGraphDestroy: {graph!r} is no live graph")
            graph.destroyed = True
            self.counts["graphs_destroyed"] += 1
            return (0,)

    def cudaGraphLaunch(self, graph_exec: Any, stream: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            if not isinstance(graph_exec, _GraphExec) or graph_exec.destroyed:
                raise EmulationError(f"cudaGraphLaunch: {graph_exec!r} is no live graph exec")
            s = self._stream(stream, "cudaGraphLaunch")
            graph_exec.launches += 1
            self.counts["graph_launches"] += 1
            ops = list(graph_exec.ops)

            def replay() -> None:
                for op in ops:
                    op()
            self._enqueue(s, replay)
            return (0,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[int]:  # noqa: N802
        with self._lock:
            if not isinstance(graph_exec, _GraphExec) or graph_exec.destroyed:
                raise EmulationError(f"cudaGraphExecDestroy: {graph_exec!r} is no live graph exec")
            graph_exec.destroyed = True
            self.counts["graph_execs_destroyed"] += 1
            return (0,)

    # -- for tests --------------------------------------------------------------------------------
    def run_in(self, stream: Any, op: Callable[[], None]) -> None:
        """Enqueue emulated device work (an engine execution) on ``stream``."""
        with self._lock:
            self._enqueue(self._stream(stream, "execute_async_v3"), op)

    def leaks(self) -> dict[str, int]:
        """What is still held: allocations, streams, graph execs."""
        return {"allocations": len(self.live), "streams": sum(not s.destroyed for s in self.streams),
                "graph_execs": sum(not g.destroyed for g in self.graph_execs)}


# -------------------------------------------------------------------------------------------------
# TensorRT


def _onnx_io(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    init = {i.name for i in model.graph.initializer}

    def one(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": v.name, "dtype": _ONNX_DTYPES[t.elem_type], "shape": dims}

    return [one(v) for v in model.graph.input if v.name not in init], [one(v) for v in model.graph.output]


def fake_tensorrt(cudart: FakeCudart, version: str = HERE["tensorrt"]) -> Any:
    """A ``tensorrt`` module: the builder (driving an INT8 calibrator the way TensorRT 10 does),
    and a runtime whose engines execute their ONNX with onnxruntime on emulated device memory.

    TensorRT 11 (``version="11..."``) has no FP16/INT8 builder flags and no INT8 calibrators,
    as in the real one. Module attributes for tests: ``builds`` (one record per
    ``build_serialized_network``), ``engines`` (deserialized), ``executions`` (one record per
    ``execute_async_v3``: engine, addresses, shapes, whether captured), ``on_execute`` (a hook
    called inside ``execute_async_v3``).
    """
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__spec__ = ModuleSpec("tensorrt", None)  # importlib.util.find_spec("tensorrt") finds it
    trt.builds = []
    trt.engines = []
    trt.executions = []
    trt.on_execute = None

    class Logger:
        WARNING = 2
        ERROR = 1

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class DataType:
        FLOAT = "FLOAT"
        HALF = "HALF"
        INT8 = "INT8"
        INT32 = "INT32"
        INT64 = "INT64"
        BOOL = "BOOL"
        UINT8 = "UINT8"

    to_trt = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "int64": "INT64",
              "bool": "BOOL", "uint8": "UINT8"}
    to_np = {v: np.dtype(k) for k, v in to_trt.items()}

    def nptype(dt: str) -> Any:
        return to_np[dt].type

    class TensorIOMode:
        NONE = "NONE"
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.path = flags, [], None
            self.io: tuple[list, list] = ([], [])
            self.qdq = False

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            import onnx

            model = onnx.load(path, load_external_data=False)
            self.network.path = path
            self.network.io = _onnx_io(model)
            self.network.inputs = [i["name"] for i in self.network.io[0]]
            self.network.qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
            return True

        def get_error(self, i: int) -> str:
            return ""

    class TimingCache:
        def serialize(self) -> bytes:
            return b"timing-cache"

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.profiles: list[Profile] = []
            self.int8_calibrator = None
            self.calibration_profile = None

        def set_memory_pool_limit(self, pool: int, size: int) -> None:
            pass

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def add_optimization_profile(self, p: Profile) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

        def set_calibration_profile(self, p: Profile) -> bool:
            self.calibration_profile = p
            return True

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            return TimingCache()

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> TimingCache:
            return TimingCache()

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            cal = config.int8_calibrator
            strongly = bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            rec = {"graph": Path(network.path).stem, "inputs": list(network.inputs), "flags": list(config.flags),
                   "strongly_typed": strongly, "calibrator": cal, "batch_size": None, "batches": [],
                   "cache_read": None, "error": None,
                   "calibration_profile": None if config.calibration_profile is None else
                   dict(config.calibration_profile.shapes)}
            trt.builds.append(rec)
            if strongly and config.flags:  # TensorRT: precision flags and strong typing exclude each other
                rec["error"] = "precision flags on a strongly typed network"
                return None
            if "INT8" in config.flags and not network.qdq and cal is None:
                rec["error"] = "INT8 without Q/DQ nodes or a calibrator: no scales"  # TensorRT fails the build
                return None
            if len(config.profiles) != 1 or set(config.profiles[0].shapes) != set(network.inputs):
                rec["error"] = "every dynamic input needs a shape in the optimisation profile"
                return None
            if cal is not None:
                rec["batch_size"] = cal.get_batch_size()
                rec["cache_read"] = cache = cal.read_calibration_cache()
                if cache is None:
                    while (ptrs := cal.get_batch(list(network.inputs))) is not None:
                        assert len(ptrs) == len(network.inputs)
                        rec["batches"].append({n: cudart.read(p, rec["calibration_profile"][n][1])
                                               for n, p in zip(network.inputs, ptrs)})
                    cal.write_calibration_cache(memoryview(f"TRT-10-EntropyCalibration2 {rec['graph']}".encode()))
            ins, outs = network.io
            for o in outs:
                if o["shape"][:1] != [-1] or -1 in o["shape"][1:]:
                    raise EmulationError(f"{rec['graph']}: output {o['name']} has shape {o['shape']}; the emulation "
                                         "runs graphs whose outputs are [batch, static dims]")
            head = {"version": version, "name": rec["graph"], "inputs": ins, "outputs": outs,
                    "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
                    "flags": list(config.flags), "strongly_typed": strongly, "calibrated": cal is not None}
            blob = json.dumps(head).encode()
            return ENGINE_MAGIC + struct.pack("<I", len(blob)) + blob + Path(network.path).read_bytes()

    class ICudaEngine:
        def __init__(self, head: dict[str, Any], onnx_bytes: bytes) -> None:
            import onnxruntime as ort

            self.head = head
            self.name = head["name"]
            self._io = {t["name"]: ("INPUT", t) for t in head["inputs"]}
            self._io.update({t["name"]: ("OUTPUT", t) for t in head["outputs"]})
            self._order = [*self._io]
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
            self.contexts: list[IExecutionContext] = []

        @property
        def num_io_tensors(self) -> int:
            return len(self._order)

        def get_tensor_name(self, i: int) -> str:
            return self._order[i]

        def _t(self, name: str) -> tuple[str, dict[str, Any]]:
            if name not in self._io:
                raise EmulationError(f"engine {self.name} has no tensor {name!r}; it has {self._order}")
            return self._io[name]

        def get_tensor_mode(self, name: str) -> str:
            return self._io[name][0] if name in self._io else TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> str:
            return to_trt[self._t(name)[1]["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self._t(name)[1]["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return [tuple(s) for s in self.head["profile"][name]]

        def create_execution_context(self) -> IExecutionContext:
            c = IExecutionContext(self)
            self.contexts.append(c)
            return c

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            mode, t = self.engine._t(name)
            if mode != "INPUT":
                return False
            lo, _, hi = self.engine.head["profile"][name]
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False  # TensorRT logs the profile bounds and refuses
            self.shapes[name] = shape
            return True

        def _batch(self) -> int | None:
            ins = [t["name"] for t in self.engine.head["inputs"]]
            if any(n not in self.shapes for n in ins):
                return None
            batches = {self.shapes[n][0] for n in ins}
            return batches.pop() if len(batches) == 1 else None

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            mode, t = self.engine._t(name)
            if mode == "INPUT":
                return self.shapes.get(name, tuple(t["shape"]))
            n = self._batch()
            return tuple(t["shape"]) if n is None else (n, *t["shape"][1:])  # -1 until every input is set

        def set_tensor_address(self, name: str, memory: Any) -> bool:
            self.engine._t(name)
            self.addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name: str) -> int:
            return self.addresses.get(name, 0)

        def execute_async_v3(self, stream_handle: Any) -> bool:
            head = self.engine.head
            n = self._batch()
            if n is None or any(name not in self.addresses for name in self.engine._order):
                return False  # TensorRT: shapes or addresses not all specified
            shapes = {t["name"]: self.get_tensor_shape(t["name"]) for t in (*head["inputs"], *head["outputs"])}
            addrs = dict(self.addresses)
            s = cudart._stream(stream_handle, "execute_async_v3")
            captured = s is not None and s.capture is not None
            for name, shape in shapes.items():  # addresses are dereferenced by the kernels: check them now
                dt = np.dtype(self.engine._t(name)[1]["dtype"])
                cudart._device(addrs[name], int(np.prod(shape)) * dt.itemsize, f"{self.engine.name}:{name}")
            trt.executions.append({"engine": self.engine.name, "addresses": addrs, "shapes": shapes,
                                   "captured": captured, "thread": threading.get_ident()})
            if trt.on_execute is not None:
                trt.on_execute(self, captured)
            engine, fp16 = self.engine, "FP16" in head["flags"]

            def op() -> None:
                feeds = {}
                for t in head["inputs"]:
                    dt = np.dtype(t["dtype"])
                    shape = shapes[t["name"]]
                    feeds[t["name"]] = cudart.read(addrs[t["name"]], shape, dt)
                outs = engine.session.run([t["name"] for t in head["outputs"]], feeds)
                for t, v in zip(head["outputs"], outs):
                    v = np.ascontiguousarray(v, t["dtype"])
                    if fp16 and v.dtype == np.float32:
                        v = v.astype(np.float16).astype(np.float32)
                    if v.shape != shapes[t["name"]]:
                        raise EmulationError(f"{engine.name}: {t['name']} computed {v.shape}, bound "
                                             f"{shapes[t['name']]}")
                    cudart.write(addrs[t["name"]], v)
            cudart.run_in(stream_handle, op)
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, blob: Any) -> ICudaEngine | None:
            data = bytes(memoryview(blob))
            if not data.startswith(ENGINE_MAGIC):
                return None  # TensorRT logs "serialization error" and returns None
            (k,) = struct.unpack("<I", data[len(ENGINE_MAGIC):len(ENGINE_MAGIC) + 4])
            start = len(ENGINE_MAGIC) + 4
            head = json.loads(data[start:start + k])
            if head["version"] != version:
                return None  # engines are tied to the TensorRT version that built them
            e = ICudaEngine(head, data[start + k:])
            trt.engines.append(e)
            return e

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    names: dict[str, Any] = {
        "Logger": Logger, "Builder": Builder, "OnnxParser": OnnxParser, "Runtime": Runtime, "DataType": DataType,
        "TensorIOMode": TensorIOMode, "nptype": nptype, "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext, "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE=0),
        "BuilderFlag": types.SimpleNamespace(FP16="FP16", INT8="INT8") if major == 10 else types.SimpleNamespace(),
    }
    if major == 10:
        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                self.base_initialised = True

        names["IInt8EntropyCalibrator2"] = IInt8EntropyCalibrator2
    for name, value in names.items():
        setattr(trt, name, value)
    return trt


def install(monkeypatch: Any, home: Path | None = None, version: str = HERE["tensorrt"]) -> types.SimpleNamespace:
    """Install the fakes for one test (or a ``pytest.MonkeyPatch.context()``): ``import tensorrt``
    gives the fake module, the tensorrt target's cuda-python is the fake runtime, and (with
    ``home``) HOME is ``home`` (timing and calibration caches go under ``~/.cache/kdedge``).

    Returns:
        ``SimpleNamespace(trt=, cudart=)``.
    """
    import kdedge.targets.tensorrt.cuda as trtmod

    if home is not None:
        monkeypatch.setenv("HOME", str(home))
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart, version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trtmod, "_cudart", lambda: cudart)
    return types.SimpleNamespace(trt=trt, cudart=cudart)

