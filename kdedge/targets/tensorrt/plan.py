"""TensorRT precision planning and build facts that need no GPU: versions, per-graph precision,
calibration rules and cache keys, optimisation-profile shapes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from kdedge.targets.base import TargetError


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
