"""The TensorRT 10 entropy calibrator of one graph (INT8 from an FP32 ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdedge.io import atomic_write_bytes
from kdedge.targets.base import TargetError
from kdedge.targets.tensorrt import cuda
from kdedge.targets.tensorrt.cuda import _NP, _check


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
    cudart = cuda._cudart()
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
                atomic_write_bytes(cache_file, bytes(memoryview(cache)))
            except OSError as e:
                self.error = TargetError(f"cannot write the calibration cache {cache_file}: {e.strerror or e}")

        def close(self) -> None:
            for ptr in self._ptrs.values():
                cudart.cudaFree(ptr)
            self._ptrs.clear()

    return Calibrator()
