"""The CUDA runtime (cuda-python) as the builder's calibrator and the sessions use it: device
tensors carried between stages, buffer pools per batch size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kdedge.targets.base import TargetError

if TYPE_CHECKING:
    from kdedge.targets.tensorrt.session import TensorRTSession

_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "int8": np.int8,
       "bool": np.bool_, "uint8": np.uint8}



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
    """A buffer set checked out by one call and held by the call's carried :class:`DeviceTensor` objects;
    it returns to the session's pool when the last of them is released (CPython frees it as
    soon as the runner drops the request's carried tensors)."""

    __slots__ = ("session", "bufs")

    def __init__(self, session: TensorRTSession, bufs: _BufferSet) -> None:
        self.session, self.bufs = session, bufs

    def __del__(self) -> None:
        self.session._give_back(self.bufs)
