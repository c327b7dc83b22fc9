"""The ``tensorrt`` target: one engine per stage and per fused prefix, built from the stage ONNX
on the device (``kdedge build BUNDLE --target tensorrt``, or ``kdedge export --target tensorrt``
run on the device), with an optimisation profile for the batch range, FP32/FP16/INT8, a timing
cache, and engine files that carry the versions they were built with.

Versions: TensorRT 10 and 11 are picked by ``tensorrt.__version__``
(:func:`precision_plan`): TensorRT 10 takes FP16/INT8 as builder flags, INT8 from the QDQ ONNX
(explicit quantization) or, from an FP32 ONNX, through an entropy calibrator fed with
calibration batches; TensorRT 11 removed those flags and calibrators: precision comes from the
network (strongly typed), so INT8 needs the QDQ ONNX that ``--precision int8`` exports, and
FP16 an FP16 ONNX (refused here, with the reason).

Graphs an INT8 export kept FP32 (its accuracy gate with ``keep_fp32``: no Q/DQ nodes, manifest
precision fp32, listed in ``quantization.fp32_graphs``) are built at FP32 by an int8 build
(:func:`graph_precisions`), on TensorRT 10 and 11 alike: calibrating them to INT8 would override
the export's decision. Their file entries say ``fp32``.

Calibration (TensorRT 10, INT8 from an FP32 ONNX): ``spec.options["calibration"]`` is a
:class:`kdedge.targets.calibration.CalibrationSet`; each graph gets its own calibrator over its
own inputs (a later stage is calibrated on the carried tensors the ONNX chain computes), one
device buffer per input, a fixed batch size with a calibration profile of exactly that batch,
and a calibration cache keyed by the graph's ONNX sha256, the data digest and the TensorRT
version (:func:`calibration_cache_path`). Calibration given where it has no use (a precision
other than int8, a bundle whose graphs are all QDQ or kept FP32) is refused
(:func:`check_calibration`).

Engine file (``tensorrt/stageK.plan``): ``KDTRT1\\n`` + 4-byte little-endian length + JSON
metadata (TensorRT, CUDA, GPU name and compute capability, JetPack/L4T, batch range,
precision, tensor names) + the serialized engine. An engine is tied to the GPU and the
TensorRT version: a mismatch is refused with a message to rebuild on the device.

Sessions bind device buffers once per batch size (a small pool per batch size, so that a
carried tensor is never overwritten by another call before the next stage read it), keep
carried tensors on the GPU (:class:`DeviceTensor`) between stages, copy only the logits to the
host, run ``execute_async_v3`` on one CUDA stream per session, and can replay a captured CUDA
graph (one per batch size and bound addresses).

Runs here: the GPU-free parts (profile shapes, metadata, mismatch refusal, version selection,
the format table, calibration rules, cache keys), and the build, the calibrator and the sessions
on an emulated TensorRT and CUDA runtime (``tests/fake_tensorrt.py``: engines that run their
ONNX with onnxruntime on emulated device memory), which checks the orchestration but not
TensorRT's numerics nor the real bindings' argument types. Real engines need TensorRT and a GPU
(tests marked ``tensorrt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, Target, TargetError

MAGIC = b"KDTRT1\n"
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "int8": np.int8,
       "bool": np.bool_, "uint8": np.uint8}
REBUILD = "rebuild the engines on this device: kdedge build BUNDLE --target tensorrt (or kdedge export RUN --target tensorrt here)"


class EngineMismatch(TargetError):
    """An engine built for another GPU, TensorRT, CUDA or JetPack version."""


# ---------------------------------------------------------------------------------------------
# GPU-free parts: versions, precision, profiles, metadata


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string; only 10 and 11 are supported."""
    m = re.match(r"^(\d+)\.", version)
    if m is None:
        raise TargetError(f"cannot read the TensorRT version {version!r}")
    major = int(m.group(1))
    if major not in (10, 11):
        raise TargetError(f"TensorRT {version} is not supported; install TensorRT 10 or 11 "
                          "(pip install 'kdedge[tensorrt]')")
    return major


def precision_plan(major: int, precision: str, onnx_is_qdq: bool, have_calibration: bool = False) -> dict[str, Any]:
    """How to build ``precision`` with TensorRT ``major`` from an ONNX file (QDQ or not).

    Returns:
        ``{"strongly_typed": bool, "flags": [BuilderFlag names], "calibrator": bool}``.

    Raises:
        TargetError: a combination that TensorRT cannot build (never silently changed).
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise TargetError(f"unknown precision {precision!r}; known: fp32, fp16, int8")
    if major == 10:
        if precision == "fp32":
            return {"strongly_typed": False, "flags": [], "calibrator": False}
        if precision == "fp16":
            return {"strongly_typed": False, "flags": ["FP16"], "calibrator": False}
        if onnx_is_qdq:  # explicit quantization: scales come from the Q/DQ nodes
            return {"strongly_typed": False, "flags": ["INT8", "FP16"], "calibrator": False}
        if not have_calibration:
            raise TargetError("TensorRT 10 INT8 from an FP32 ONNX needs calibration images (the entropy "
                              "calibrator); pass calibration data, or export with --precision int8 (QDQ ONNX)")
        return {"strongly_typed": False, "flags": ["INT8"], "calibrator": True}
    if precision == "fp32":
        return {"strongly_typed": True, "flags": [], "calibrator": False}
    if precision == "int8":
        if not onnx_is_qdq:
            raise TargetError("TensorRT 11 builds INT8 only from a QDQ ONNX (it has no INT8 calibrator); export the "
                              "bundle with --precision int8, then build it")
        return {"strongly_typed": True, "flags": [], "calibrator": False}
    raise TargetError("TensorRT 11 takes precision from the network and has no FP16 builder flag; an FP16 engine "
                      "needs an FP16 ONNX, which kdedge does not write: build fp32, or int8 from a QDQ bundle")


def graph_precisions(precision: str, qdq: Mapping[str, bool], kept: Collection[str] = ()) -> dict[str, str]:
    """The precision each graph is built at: the one asked for, except that an INT8 build keeps
    at FP32 the graphs that the export's INT8 accuracy gate kept FP32 (``quantization.fp32_graphs``
    of a ``--precision int8`` bundle; their ONNX has no Q/DQ nodes). Neither calibrating them to
    INT8 nor failing for want of calibration images would honour the export's decision.

    Args:
        precision: the requested precision.
        qdq: graph name -> its ONNX is QDQ.
        kept: the graphs the export kept FP32.

    Returns:
        graph name -> ``fp32``, ``fp16`` or ``int8``.
    """
    return {g: "fp32" if precision == "int8" and g in kept and not is_qdq else precision for g, is_qdq in qdq.items()}


def check_calibration(precision: str, qdq: Mapping[str, bool], calibrated: bool, kept: Collection[str] = ()) -> None:
    """Refuse calibration images where no graph would use them (never silently ignored).

    Args:
        precision: the requested precision.
        qdq: graph name -> its ONNX is QDQ (an INT8 export; TensorRT reads its scales).
        calibrated: calibration images were given.
        kept: the graphs the export's INT8 gate kept FP32 (built FP32: not calibrated).

    Raises:
        TargetError: calibration with a precision other than int8, or for a bundle whose graphs
            are all QDQ or kept FP32.
    """
    if not calibrated:
        return
    if precision != "int8":
        raise TargetError(f"calibration images are used only to build int8 engines, this build is {precision}; "
                          "drop --calib/--calib-data, or build with --precision int8")
    plain = [g for g, is_qdq in qdq.items() if not is_qdq]
    if qdq and not plain:
        raise TargetError("this bundle is INT8 QDQ (exported with --precision int8): TensorRT takes the scales from "
                          "its Q/DQ nodes and needs no calibration; drop --calib/--calib-data")
    if qdq and all(g in kept for g in plain):
        raise TargetError(f"no graph of this bundle needs calibration: its QDQ graphs take their scales from the Q/DQ "
                          f"nodes and the graphs its export kept FP32 ({', '.join(plain)}) are built FP32; drop "
                          "--calib/--calib-data")


def calibration_cache_path(directory: Path, graph: str, onnx_sha256: str, data_digest: str, trt_version: str) -> Path:
    """The calibration cache of one graph: keyed by its ONNX, the calibration data (images, batch
    size and the graphs that compute its inputs) and the TensorRT version, so that a cache is
    never reused for another bundle, other data or another TensorRT."""
    key = hashlib.sha256(f"{onnx_sha256}\0{data_digest}\0{trt_version}".encode()).hexdigest()[:32]
    return Path(directory) / f"calib-{re.sub(r'[^A-Za-z0-9_]', '_', graph)}-{key}.cache"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # builds in other processes may write the same key
    tmp.write_bytes(data)
    os.replace(tmp, path)


def profile_shapes(inputs: Sequence[tuple[str, Sequence[int]]], min_batch: int, opt_batch: int,
                   max_batch: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The optimisation profile: per input, (min, opt, max) shapes over the batch range."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise TargetError(f"batch range must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    return {name: ((min_batch, *shape), (opt_batch, *shape), (max_batch, *shape)) for name, shape in inputs}


def onnx_is_qdq(path: Path) -> bool:
    """The ONNX graph has QuantizeLinear/DequantizeLinear nodes (an INT8 QDQ export)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def jetpack_facts(root: Path = Path("/")) -> dict[str, Any]:
    """L4T release and board of a Jetson (None elsewhere)."""
    rel = root / "etc/nv_tegra_release"
    model = root / "proc/device-tree/model"
    l4t = None
    if rel.is_file():
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", rel.read_text())
        l4t = f"{m.group(1)}.{m.group(2)}" if m else rel.read_text().splitlines()[0].strip()
    return {"l4t": l4t, "board": model.read_text().strip("\x00\n ") if model.is_file() else None}


def device_facts() -> dict[str, Any]:
    """This machine's TensorRT, CUDA runtime, GPU and JetPack facts (needs tensorrt and cuda-python)."""
    import tensorrt as trt

    cudart = _cudart()
    err, ver = cudart.cudaRuntimeGetVersion()
    _check(err, "cudaRuntimeGetVersion")
    err, dev = cudart.cudaGetDevice()
    _check(err, "cudaGetDevice")
    err, prop = cudart.cudaGetDeviceProperties(dev)
    _check(err, "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt": trt.__version__, "cuda": f"{ver // 1000}.{(ver % 1000) // 10}", "gpu": name.strip("\x00 "),
            "compute_capability": f"{prop.major}.{prop.minor}", **{f"jetson_{k}": v for k, v in jetpack_facts().items()}}


def check_engine_meta(meta: Mapping[str, Any], here: Mapping[str, Any], where: str = "engine") -> None:
    """Refuse an engine built with another TensorRT, GPU, CUDA major or L4T release than ``here``."""
    for key, what in (("tensorrt", "TensorRT"), ("compute_capability", "GPU compute capability"), ("gpu", "GPU"),
                      ("jetson_l4t", "JetPack (L4T)")):
        if meta.get(key) != here.get(key):
            raise EngineMismatch(f"{where} was built for {what} {meta.get(key)!r}, this device has {here.get(key)!r}; "
                                 f"{REBUILD}")
    if str(meta.get("cuda", "")).split(".")[0] != str(here.get("cuda", "")).split(".")[0]:
        raise EngineMismatch(f"{where} was built with CUDA {meta.get('cuda')}, this device has {here.get('cuda')}; {REBUILD}")


def write_engine(path: Path, meta: Mapping[str, Any], engine: bytes) -> None:
    """Write an engine file (header, metadata, engine) atomically."""
    head = json.dumps(dict(meta), sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + struct.pack("<I", len(head)) + head)
        fh.write(engine)
    os.replace(tmp, path)


def read_engine(path: Path) -> tuple[dict[str, Any], bytes]:
    """The metadata and serialized engine of an engine file."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise TargetError(f"{path} is not a kdedge TensorRT engine file; {REBUILD}")
    (n,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        meta = json.loads(data[start:start + n])
    except ValueError:
        raise TargetError(f"{path}: damaged engine metadata; {REBUILD}") from None
    return meta, data[start + n:]


def timing_cache_path(directory: Path, here: Mapping[str, Any]) -> Path:
    """A timing cache per TensorRT version and GPU (caches are tied to both)."""
    key = re.sub(r"[^A-Za-z0-9_.]", "_", f"trt{here.get('tensorrt')}-sm{here.get('compute_capability')}")
    return Path(directory) / f"timing-{key}.cache"


# ---------------------------------------------------------------------------------------------
# CUDA runtime (cuda-python), used by the builder's calibrator and the sessions


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise TargetError("the tensorrt target needs cuda-python for device memory; install it with: "
                              "pip install 'kdedge[tensorrt]'") from None
    return cudart


def _check(err: Any, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"CUDA call {what} failed with error {int(err)} ({err})")


class DeviceTensor:
    """A stage output in GPU memory, carried to a later stage: the next TensorRT stage binds its
    address (no copy); ``numpy()``, ``np.asarray`` or indexing (the runner drops samples with a
    boolean mask) copy it to the host.

    It keeps the buffer set it lives in checked out of its session's pool, so later calls of that
    session (another thread's request, or the caller's next batch) write into other buffers; the
    set goes back to the pool when the last tensor of the call is released. After the session is
    closed its memory is freed and using the tensor raises :class:`TargetError`.
    """

    __slots__ = ("ptr", "shape", "dtype", "_lease")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: Any, lease: _Lease) -> None:
        self.ptr, self.shape, self.dtype, self._lease = int(ptr), tuple(shape), np.dtype(dtype), lease

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def freed(self) -> bool:
        """Its session was closed: the memory is gone."""
        return self._lease.bufs.freed

    def numpy(self) -> np.ndarray:
        """A host copy."""
        return self._lease.session._to_host(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a DeviceTensor lives in GPU memory; it can only be copied to the host")
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, index: Any) -> np.ndarray:  # the runner drops samples with a boolean mask
        return self.numpy()[index]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceTensor({self.ptr:#x}, shape={list(self.shape)}, dtype={self.dtype})"


class _BufferSet:
    """Device memory for every input and output of one engine at one batch size."""

    __slots__ = ("n", "ptrs", "shapes", "freed")

    def __init__(self, n: int) -> None:
        self.n, self.ptrs, self.shapes, self.freed = n, {}, {}, False


class _Lease:
    """A buffer set checked out by one call and held by the call's carried :class:`DeviceTensor`\ s;
    it returns to the session's pool when the last of them is released (CPython frees it as
    soon as the runner drops the request's carried tensors)."""

    __slots__ = ("session", "bufs")

    def __init__(self, session: TensorRTSession, bufs: _BufferSet) -> None:
        self.session, self.bufs = session, bufs

    def __del__(self) -> None:
        self.session._give_back(self.bufs)


# ---------------------------------------------------------------------------------------------
# sessions


class TensorRTSession:
    """One engine on one CUDA stream, with device buffers bound once per batch size.

    Memory: for each batch size, a pool of buffer sets (one device buffer per input and output).
    A call checks a set out, copies host inputs into it (a carried :class:`DeviceTensor` is bound
    by its address instead), runs the engine, copies the host outputs (the logits) back and
    returns the other outputs as :class:`DeviceTensor`\ s that keep the set checked out until they
    are released. In a single-threaded loop the same set comes back every call (no allocation,
    stable addresses, so a captured CUDA graph is replayed); concurrent requests, or a caller
    holding an earlier call's outputs, get a set of their own instead of having their carried
    tensors overwritten.

    Threads: one execution context and one stream, so one call at a time (a lock); copying a
    carried tensor to the host takes the same lock, since the stream may be capturing a graph.

    CUDA graphs (``cuda_graphs=True``): one graph per batch size and set of bound addresses,
    captured in ``ThreadLocal`` mode (other threads' CUDA calls stay legal during the capture)
    after one ordinary run (which settles TensorRT's shape-dependent allocations), then replayed.
    """

    can_abort = False  # TensorRT has no cancellation of an enqueued execution
    can_bind = False

    def __init__(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 host_outputs: Sequence[str] | None = None, cuda_graphs: bool = False,
                 facts: Mapping[str, Any] | None = None) -> None:
        import tensorrt as trt

        meta, blob = read_engine(Path(path))
        check_engine_meta(meta, facts or device_facts(), where=str(path))
        if meta.get("inputs") != list(inputs) or meta.get("outputs") != list(outputs):
            raise TargetError(f"{path} was built for inputs {meta.get('inputs')} / outputs {meta.get('outputs')}; the "
                              f"manifest lists {list(inputs)} / {list(outputs)}; {REBUILD}")
        self._trt, self._cudart = trt, _cudart()
        self.name, self.inputs, self.outputs = name, tuple(inputs), tuple(outputs)
        self.meta = meta
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {path}; {REBUILD}")
        io = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if io != {*self.inputs, *self.outputs}:
            raise EngineMismatch(f"{path}: the engine's tensors {sorted(io)} are not the manifest's "
                                 f"{sorted({*self.inputs, *self.outputs})}; {REBUILD}")
        self._dtypes = {t: np.dtype(trt.nptype(self._engine.get_tensor_dtype(t))) for t in (*self.inputs, *self.outputs)}
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.name} (out of GPU memory?)")
        err, self._stream = self._cudart.cudaStreamCreate()
        _check(err, "cudaStreamCreate")
        self._host = set(self.outputs if host_outputs is None else host_outputs)
        self._free: dict[int, list[_BufferSet]] = {}  # per batch size: sets not checked out
        self._sets: list[_BufferSet] = []  # every set, to free at close
        self._graphs: dict[tuple[int, tuple[int, ...]], Any] = {}
        self._cuda_graphs = bool(cuda_graphs)
        self._lock = threading.Lock()  # one execution context and stream: one call at a time
        self._closed = False
        lo, hi = meta["batch_range"]
        self._range = (int(lo), int(hi))

    # -- buffers ---------------------------------------------------------------------------------
    def _checkout(self, n: int) -> _BufferSet:
        """A free buffer set for batch ``n`` (input shapes already set on the context), else a new one."""
        try:
            return self._free.setdefault(n, []).pop()  # LIFO: a sequential caller gets the same set back
        except IndexError:
            pass
        bufs = _BufferSet(n)
        try:
            for t in (*self.inputs, *self.outputs):
                shape = tuple(int(d) for d in self._context.get_tensor_shape(t))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"TensorRT left the shape of {t} unresolved ({list(shape)}) in {self.name}")
                err, ptr = self._cudart.cudaMalloc(max(int(np.prod(shape)) * self._dtypes[t].itemsize, 1))
                _check(err, "cudaMalloc")
                bufs.ptrs[t], bufs.shapes[t] = int(ptr), shape
        except BaseException:
            for ptr in bufs.ptrs.values():
                self._cudart.cudaFree(ptr)
            raise
        self._sets.append(bufs)
        return bufs

    def _give_back(self, bufs: _BufferSet) -> None:
        # may run in any thread (a lease released by the garbage collector): a list append is
        # atomic, so no lock, which the releasing thread might already hold
        if not bufs.freed:
            self._free.setdefault(bufs.n, []).append(bufs)

    def _to_host(self, t: DeviceTensor) -> np.ndarray:
        cudart = self._cudart
        out = np.empty(t.shape, t.dtype)
        with self._lock:  # the stream may be capturing a graph in another thread's call
            if t.freed:
                raise TargetError(f"{self.name}: this carried tensor's session was closed and its GPU memory freed; "
                                  "copy carried tensors to the host before closing the runner")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, t.ptr, t.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)[0], "memcpy D2H")
            _check(cudart.cudaStreamSynchronize(self._stream)[0], "cudaStreamSynchronize")
        return out

    # -- running ---------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, Any], abort: Any = None) -> dict[str, Any]:
        """Run once; host outputs come back as numpy arrays, the others as :class:`DeviceTensor`."""
        cudart = self._cudart
        n = int(inputs[self.inputs[0]].shape[0])
        if not self._range[0] <= n <= self._range[1]:
            raise TargetError(f"{self.name}: batch {n} is outside the engine's profile {self._range}; rebuild with "
                              "--max-batch covering it")
        out: dict[str, Any] = {}
        with self._lock:
            if self._closed:
                raise TargetError(f"{self.name}: the session is closed")
            for t in self.inputs:
                shape = tuple(int(d) for d in inputs[t].shape)
                if not self._context.set_input_shape(t, shape):
                    want = [int(d) for d in self._engine.get_tensor_shape(t)][1:]
                    raise TargetError(f"{self.name}: TensorRT refuses the input shape {list(shape)} for {t}; the engine "
                                      f"takes batches {self._range[0]}..{self._range[1]} of {want}")
            bufs = self._checkout(n)
            try:
                addresses = []
                for t in self.inputs:
                    a = inputs[t]
                    if isinstance(a, DeviceTensor):  # carried on the GPU from an earlier stage: no copy
                        if a.freed:
                            raise TargetError(f"{self.name}: the carried tensor {t} was freed with its session")
                        if a.dtype != self._dtypes[t]:
                            raise TargetError(f"{self.name}: {t} arrives as {a.dtype} on the GPU, the engine reads "
                                              f"{self._dtypes[t]}; {REBUILD}")
                        ptr = a.ptr
                    else:
                        a = np.ascontiguousarray(a, self._dtypes[t])
                        ptr = bufs.ptrs[t]
                        _check(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)[0],
                               "memcpy H2D")  # pageable source: staged before the call returns
                    self._context.set_tensor_address(t, ptr)
                    addresses.append(ptr)
                for t in self.outputs:
                    self._context.set_tensor_address(t, bufs.ptrs[t])
                    addresses.append(bufs.ptrs[t])
                if self._cuda_graphs:
                    self._launch_graph((n, tuple(addresses)))
                elif not self._context.execute_async_v3(self._stream):
                    raise RuntimeError(f"TensorRT failed running {self.name}")
                for t in self.outputs:
                    if t in self._host:
                        h = np.empty(bufs.shapes[t], self._dtypes[t])
                        _check(cudart.cudaMemcpyAsync(h.ctypes.data, bufs.ptrs[t], h.nbytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                                      self._stream)[0], "memcpy D2H")
                        out[t] = h
                # the next stage runs on its own stream: its inputs must be complete when this returns
                _check(cudart.cudaStreamSynchronize(self._stream)[0], "cudaStreamSynchronize")
            except BaseException:
                self._give_back(bufs)
                raise
        carried = [t for t in self.outputs if t not in self._host]
        if not carried:
            self._give_back(bufs)
            return out
        lease = _Lease(self, bufs)
        for t in carried:
            out[t] = DeviceTensor(bufs.ptrs[t], bufs.shapes[t], self._dtypes[t], lease)
        return {t: out[t] for t in self.outputs}

    def _launch_graph(self, key: tuple[int, tuple[int, ...]]) -> None:
        """Launch the graph captured for this batch size and these addresses (capture it first)."""
        cudart = self._cudart
        g = self._graphs.get(key)
        if g is None:
            # settle shapes and TensorRT's allocations outside the capture (they are not capturable)
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError(f"TensorRT failed running {self.name}")
            # ThreadLocal: only this thread's unsafe calls (cudaMalloc...) would break the capture,
            # not those of other threads running other stages
            _check(cudart.cudaStreamBeginCapture(
                self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0],
                "cudaStreamBeginCapture")
            try:
                ok = self._context.execute_async_v3(self._stream)
            finally:
                err, graph = cudart.cudaStreamEndCapture(self._stream)
            if not ok:
                raise RuntimeError(f"TensorRT failed running {self.name} under CUDA graph capture")
            _check(err, "cudaStreamEndCapture")
            try:
                err, g = cudart.cudaGraphInstantiate(graph, 0)
                _check(err, "cudaGraphInstantiate")
            finally:
                cudart.cudaGraphDestroy(graph)  # the executable graph does not need it
            self._graphs[key] = g
        _check(cudart.cudaGraphLaunch(g, self._stream)[0], "cudaGraphLaunch")

    def abort_handle(self) -> Any:
        raise TargetError(f"{self.name}: the tensorrt target cannot abort a running stage (can_abort is False)")

    def close(self) -> None:
        """Free every buffer set (carried tensors still held become unusable), the graphs, the
        stream, the context and the engine. Errors are not raised: nothing could be done about
        them, and the runner closes its other sessions after this one."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cudart = self._cudart
            for g in self._graphs.values():
                cudart.cudaGraphExecDestroy(g)
            self._graphs.clear()
            for bufs in self._sets:
                bufs.freed = True
                for ptr in bufs.ptrs.values():
                    cudart.cudaFree(ptr)
            self._sets.clear()
            self._free.clear()
            cudart.cudaStreamDestroy(self._stream)
            self._context = None  # the context before the engine it came from
            self._engine = None


# ---------------------------------------------------------------------------------------------
# the target


class TensorRTTarget(Target):
    """Engines per stage and prefix, built from the stage ONNX on the device."""

    name = "tensorrt"
    description = "TensorRT engines (10 or 11) per stage and prefix, built from the stage ONNX on the device"
    caps = Capabilities(precisions=("fp32", "fp16", "int8"), dynamic_batch=True, can_abort=False, devices=("cuda",),
                        source="onnx", cuda_graphs=True)
    device_option = None  # sessions run on the current CUDA device (CUDA_VISIBLE_DEVICES picks it)
    run_options = ("cuda_graphs",)
    compile_requires = ("tensorrt", "onnx")
    run_requires = ("tensorrt",)
    extra = "tensorrt"
    folder = "tensorrt"
    suffix = ".plan"
    calibrates = True  # takes spec.options["calibration"] (TensorRT 10, INT8 from an FP32 ONNX)

    def check_build(self, spec: CompileSpec, qdq: Mapping[str, bool], calibration_batch: int | None,
                    kept: Collection[str] = ()) -> None:
        """Refuse a build request before any work: calibration where it has no use, a calibration
        batch outside the batch range and, when TensorRT is installed, a precision its version
        cannot build (:func:`precision_plan`, per graph, at :func:`graph_precisions`).

        Args:
            spec: the checked request.
            qdq: graph name -> its ONNX is QDQ.
            calibration_batch: the calibration batch size, None without calibration.
            kept: the graphs the export's INT8 gate kept FP32 (an int8 build builds them FP32).
        """
        check_calibration(spec.precision, qdq, calibration_batch is not None, kept)
        if calibration_batch is not None and not spec.min_batch <= calibration_batch <= spec.max_batch:
            raise TargetError(f"the calibration batch {calibration_batch} is outside the engine's batch range "
                              f"{spec.min_batch}..{spec.max_batch}; pass --calib-batch within it")
        if self.can_compile():
            import tensorrt as trt

            major = trt_major(trt.__version__)
            for g, precision in graph_precisions(spec.precision, qdq, kept).items():
                precision_plan(major, precision, qdq[g], have_calibration=calibration_batch is not None)

    def compile(self, graphs: Sequence[GraphSource], spec: CompileSpec, out_dir: Path) -> dict[str, CompiledFile]:
        """One engine per graph; options: ``calibration`` (a
        :class:`~kdedge.targets.calibration.CalibrationSet`), ``timing_cache_dir`` (also where
        calibration caches go), ``workspace_mb``, ``fp32_graphs`` (the graphs the export's INT8
        gate kept FP32: an int8 build builds them FP32, :func:`graph_precisions`; ``kdedge
        build`` passes the bundle's ``quantization.fp32_graphs``). Each file's precision is its
        graph's."""
        spec = self.check(spec)
        self.require("compile")
        import tensorrt as trt

        major = trt_major(trt.__version__)
        calib = spec.options.get("calibration")
        kept = tuple(spec.options.get("fp32_graphs", ()))
        qdq = {g.name: onnx_is_qdq(Path(g.onnx)) for g in graphs if g.onnx is not None}
        self.check_build(spec, qdq, None if calib is None else int(calib.batch_size), kept)
        precisions = graph_precisions(spec.precision, qdq, kept)
        here = device_facts()
        out_dir.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(spec.options.get("timing_cache_dir", Path.home() / ".cache" / "kdedge" / "tensorrt"))
        cache_path = timing_cache_path(cache_dir, here)
        out = {}
        for g in graphs:
            out[g.name] = self._build(trt, major, here, g, spec, out_dir, cache_path, qdq.get(g.name, False),
                                      precisions.get(g.name, spec.precision))
        return out

    def _build(self, trt: Any, major: int, here: Mapping[str, Any], g: GraphSource, spec: CompileSpec,
               out_dir: Path, cache_path: Path, is_qdq: bool, precision: str) -> CompiledFile:
        if g.onnx is None:
            raise TargetError(f"{g.name}: the tensorrt target builds from the stage ONNX file, none was given")
        calib = spec.options.get("calibration")
        plan = precision_plan(major, precision, is_qdq, have_calibration=calib is not None)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if plan["strongly_typed"]:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(g.onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TargetError(f"TensorRT cannot parse {g.name}'s ONNX (an op or shape it does not support): {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.options.get("workspace_mb", 1024)) << 20)
        for f in plan["flags"]:
            config.set_flag(getattr(trt.BuilderFlag, f))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(list(zip(g.inputs, g.input_shapes)), spec.min_batch,
                                                  spec.opt_batch, spec.max_batch).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        calibrator = None
        record = None
        if plan["calibrator"]:
            batches = calib.for_graph(g.name)
            if tuple(batches.inputs) != tuple(g.inputs):
                raise TargetError(f"{g.name}: the calibration batches hold {list(batches.inputs)}, the graph reads "
                                  f"{list(g.inputs)}; make the calibration set from this bundle")
            from kdedge.runtime.bundle import sha256_path

            cal_file = calibration_cache_path(cache_path.parent, g.name, sha256_path(g.onnx), batches.digest,
                                              str(trt.__version__))
            calibrator = _calibrator(trt, batches, cal_file)
            config.int8_calibrator = calibrator
            # a profile of exactly the calibration batch: with dynamic shapes TensorRT calibrates at
            # the calibration profile's OPT shape, which must be the batches' shape
            cal_profile = builder.create_optimization_profile()
            for name, shape in zip(g.inputs, g.input_shapes):
                full = (batches.batch_size, *shape)
                cal_profile.set_shape(name, full, full, full)
            config.set_calibration_profile(cal_profile)
            record = {**calib.record(), "graph_digest": batches.digest, "cache": cal_file.name}
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        try:
            engine = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()
        if calibrator is not None and calibrator.error is not None:
            raise calibrator.error  # raised inside a TensorRT callback, which cannot carry it
        if engine is None:
            raise TargetError(f"TensorRT could not build an engine for {g.name} ({precision}); see the "
                              "TensorRT log above")
        if record is not None:
            record.update(batches_fed=calibrator.fed, cache_reused=calibrator.cache_reused)
        _write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        meta = {**here, "name": g.name, "inputs": list(g.inputs), "outputs": list(g.outputs),
                "precision": precision, "batch_range": [spec.min_batch, spec.max_batch],
                "opt_batch": spec.opt_batch, "strongly_typed": plan["strongly_typed"], "flags": plan["flags"],
                "calibration": None if record is None else record["digest"]}
        dest = out_dir / f"{g.name}{self.suffix}"
        write_engine(dest, meta, bytes(memoryview(engine)))
        extra = {k: meta[k] for k in ("tensorrt", "cuda", "gpu", "compute_capability", "jetson_l4t", "batch_range",
                                      "strongly_typed")}
        if record is not None:
            extra["calibration"] = record
        return CompiledFile(dest, precision, extra)

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> TensorRTSession:
        """A :class:`TensorRTSession`; options ``host_outputs``, ``cuda_graphs``."""
        self.require("run")
        unknown = set(options) - {"host_outputs", "cuda_graphs", "facts"}
        if unknown:
            raise TargetError(f"unknown tensorrt session option(s) {sorted(unknown)}; known: host_outputs, cuda_graphs")
        return TensorRTSession(path, name=name, inputs=inputs, outputs=outputs, **options)

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> TensorRTSession:
        opts = dict(options or {})
        opts.setdefault("host_outputs", (entry.logits_tensor,))
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)


def _calibrator(trt: Any, batches: Any, cache_file: Path) -> Any:
    """A TensorRT 10 entropy calibrator for one graph.

    Args:
        trt: the ``tensorrt`` module.
        batches: the graph's :class:`~kdedge.targets.calibration.GraphBatches` (re-iterable of
            ``{tensor name: array [batch_size, ...]}``; ``inputs``, ``shapes``, ``dtypes``,
            ``batch_size``).
        cache_file: where the calibration table is read from and written to (atomically).

    The calibrator allocates one device buffer per input at its first batch, answers
    ``get_batch(names)`` with one device pointer per name in the order of ``names``, returns None
    at the end of the data, and keeps an exception raised in a callback in ``error`` (TensorRT
    cannot carry it) for the build to re-raise. ``close()`` frees the buffers.
    """
    cudart = _cudart()
    names_ = tuple(batches.inputs)
    size = int(batches.batch_size)
    spec_ = {n: ((size, *(int(d) for d in s)), np.dtype(_NP.get(dt, dt)))
             for n, s, dt in zip(names_, batches.shapes, batches.dtypes)}

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._it: Any = None
            self._ptrs: dict[str, int] = {}
            self.fed = 0
            self.cache_reused = False
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return size  # fixed up front: TensorRT may ask before the first batch

        def get_batch(self, names: Sequence[str]) -> Any:
            if self.error is not None:
                return None
            try:
                return self._next(list(names))
            except Exception as e:  # noqa: BLE001 - re-raised by the build, after TensorRT returns
                self.error = e if isinstance(e, TargetError) else TargetError(
                    f"calibrating {batches.name}: {type(e).__name__}: {e}")
                return None

        def _next(self, names: list[str]) -> list[int] | None:
            unknown = [n for n in names if n not in spec_]
            if unknown:
                raise TargetError(f"calibrating {batches.name}: TensorRT asks for input(s) {unknown}, the calibration "
                                  f"batches hold {list(names_)}")
            if self._it is None:
                self._it = iter(batches)
            batch = next(self._it, None)
            if batch is None:
                return None
            if not self._ptrs:
                for n, (shape, dtype) in spec_.items():
                    err, ptr = cudart.cudaMalloc(int(np.prod(shape)) * dtype.itemsize)
                    _check(err, "cudaMalloc")
                    self._ptrs[n] = int(ptr)
            out = []
            for n in names:
                shape, dtype = spec_[n]
                a = np.ascontiguousarray(batch[n], dtype)
                if a.shape != shape:
                    raise TargetError(f"calibrating {batches.name}: batch of {n} has shape {list(a.shape)}, expected "
                                      f"{list(shape)}")
                _check(cudart.cudaMemcpy(self._ptrs[n], a.ctypes.data, a.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)[0], "memcpy H2D")
                out.append(self._ptrs[n])
            self.fed += 1
            return out

        def read_calibration_cache(self) -> Any:
            if cache_file.is_file():
                self.cache_reused = True
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                _write_atomic(cache_file, bytes(memoryview(cache)))
            except OSError as e:
                self.error = TargetError(f"cannot write the calibration cache {cache_file}: {e.strerror or e}")

        def close(self) -> None:
            for ptr in self._ptrs.values():
                cudart.cudaFree(ptr)
            self._ptrs.clear()

    return Calibrator()
