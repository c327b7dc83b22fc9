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

Layout: :mod:`~kdedge.targets.tensorrt.plan` (GPU-free precision planning),
:mod:`~kdedge.targets.tensorrt.engine` (the engine file and device facts),
:mod:`~kdedge.targets.tensorrt.cuda` (device memory), :mod:`~kdedge.targets.tensorrt.session`,
:mod:`~kdedge.targets.tensorrt.calibrator`, :mod:`~kdedge.targets.tensorrt.target`.
"""

from __future__ import annotations

from kdedge.targets.tensorrt.cuda import DeviceTensor
from kdedge.targets.tensorrt.engine import (MAGIC, REBUILD, EngineMismatch, check_engine_meta, device_facts,
                                            jetpack_facts, read_engine, timing_cache_path, write_engine)
from kdedge.targets.tensorrt.plan import (calibration_cache_path, check_calibration, graph_precisions, onnx_is_qdq,
                                          precision_plan, profile_shapes, trt_major)
from kdedge.targets.tensorrt.session import TensorRTSession
from kdedge.targets.tensorrt.target import TensorRTTarget

__all__ = ["DeviceTensor", "EngineMismatch", "MAGIC", "REBUILD", "TensorRTSession", "TensorRTTarget",
           "calibration_cache_path", "check_calibration", "check_engine_meta", "device_facts", "graph_precisions",
           "jetpack_facts", "onnx_is_qdq", "precision_plan", "profile_shapes", "read_engine", "timing_cache_path",
           "trt_major", "write_engine"]
