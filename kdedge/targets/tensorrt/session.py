"""The TensorRT session: one engine, device buffers bound once per batch size, carried tensors
kept on the GPU, CUDA-graph replay."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdedge.targets.base import TargetError
from kdedge.targets.tensorrt import cuda
from kdedge.targets.tensorrt.cuda import DeviceTensor, _BufferSet, _check, _Lease
from kdedge.targets.tensorrt.engine import REBUILD, EngineMismatch, check_engine_meta, device_facts, read_engine


class TensorRTSession:
    """One engine on one CUDA stream, with device buffers bound once per batch size.

    Memory: for each batch size, a pool of buffer sets (one device buffer per input and output).
    A call checks a set out, copies host inputs into it (a carried :class:`DeviceTensor` is bound
    by its address instead), runs the engine, copies the host outputs (the logits) back and
    returns the other outputs as :class:`DeviceTensor` objects that keep the set checked out until they
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
        self._trt, self._cudart = trt, cuda._cudart()
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
