"""TensorRT: the parts that need no GPU (version selection, precision plans, profile shapes,
engine files and the refusal of engines built elsewhere) run everywhere; building and running
engines needs TensorRT and an NVIDIA GPU (marked ``tensorrt``, skipped here with the reason)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdedge.targets import get_target
from kdedge.targets.base import CompileSpec, TargetError, TargetUnavailable
from kdedge.targets.tensorrt import (EngineMismatch, check_engine_meta, jetpack_facts, onnx_is_qdq, precision_plan,
                                     profile_shapes, read_engine, timing_cache_path, trt_major, write_engine)

HERE = {"tensorrt": "10.13.0.35", "cuda": "12.9", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "jetson_l4t": None, "jetson_board": None}


def test_version_selection() -> None:
    assert trt_major("10.13.0.35") == 10
    assert trt_major("11.0.0") == 11
    with pytest.raises(TargetError, match="TensorRT 8.6.1 is not supported; install TensorRT 10 or 11"):
        trt_major("8.6.1")


def test_precision_plans_by_version() -> None:
    assert precision_plan(10, "fp32", False) == {"strongly_typed": False, "flags": [], "calibrator": False}
    assert precision_plan(10, "fp16", False)["flags"] == ["FP16"]
    assert precision_plan(10, "int8", True) == {"strongly_typed": False, "flags": ["INT8", "FP16"], "calibrator": False}
    assert precision_plan(10, "int8", False, have_calibration=True)["calibrator"] is True
    with pytest.raises(TargetError, match="needs calibration images"):
        precision_plan(10, "int8", False)
    assert precision_plan(11, "fp32", False) == {"strongly_typed": True, "flags": [], "calibrator": False}
    assert precision_plan(11, "int8", True) == {"strongly_typed": True, "flags": [], "calibrator": False}
    with pytest.raises(TargetError, match="TensorRT 11 builds INT8 only from a QDQ ONNX"):
        precision_plan(11, "int8", False, have_calibration=True)
    with pytest.raises(TargetError, match="no FP16 builder flag"):
        precision_plan(11, "fp16", False)


def test_profile_shapes_cover_the_batch_range() -> None:
    shapes = profile_shapes([("input", (3, 32, 32)), ("stage0__f0", (16, 8, 8))], 1, 4, 64)
    assert shapes["input"] == ((1, 3, 32, 32), (4, 3, 32, 32), (64, 3, 32, 32))
    assert shapes["stage0__f0"][2] == (64, 16, 8, 8)
    with pytest.raises(TargetError, match="min <= opt <= max"):
        profile_shapes([("input", (3,))], 4, 2, 8)


def test_engine_file_round_trip_and_mismatch_refusal(tmp_path: Path) -> None:
    path = tmp_path / "stage0.plan"
    meta = {**HERE, "name": "stage0", "inputs": ["input"], "outputs": ["stage0__logits"], "batch_range": [1, 64]}
    write_engine(path, meta, b"\x00engine-bytes")
    got, blob = read_engine(path)
    assert got == meta and blob == b"\x00engine-bytes"
    check_engine_meta(got, HERE)
    for key, value, what in (("tensorrt", "10.8.0.43", "TensorRT"), ("compute_capability", "8.7", "compute capability"),
                             ("gpu", "Orin", "GPU"), ("cuda", "13.0", "CUDA"), ("jetson_l4t", "36.4.3", "JetPack")):
        with pytest.raises(EngineMismatch, match=f"{what}.*rebuild the engines on this device: kdedge build BUNDLE "
                                                 "--target tensorrt"):
            check_engine_meta(got, {**HERE, key: value})
    check_engine_meta(got, {**HERE, "cuda": "12.4"})  # same CUDA major: engines load
    path.write_bytes(b"not an engine")
    with pytest.raises(TargetError, match="not a kdedge TensorRT engine file"):
        read_engine(path)


def test_timing_cache_is_keyed_by_version_and_gpu(tmp_path: Path) -> None:
    a = timing_cache_path(tmp_path, HERE)
    b = timing_cache_path(tmp_path, {**HERE, "compute_capability": "8.7"})
    assert a != b and a.parent == tmp_path and "10.13.0.35" in a.name


def test_jetpack_facts_from_the_release_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert jetpack_facts(tmp_path) == {"l4t": "36.4.3", "board": "NVIDIA Jetson AGX Orin Developer Kit"}
    assert jetpack_facts(tmp_path / "nothing") == {"l4t": None, "board": None}


def test_qdq_detection() -> None:
    from helpers_anytime import toy_bundle

    assert onnx_is_qdq(toy_bundle("fp32", False) / "onnx" / "stage0.onnx") is False


def test_requests_and_missing_library() -> None:
    t = get_target("tensorrt")
    info = t.info()
    assert info["precisions"] == ["fp32", "fp16", "int8"] and info["source"] == "onnx" and info["devices"] == ["cuda"]
    with pytest.raises(TargetError, match="does not run on device 'cpu'"):
        t.check(CompileSpec(device="cpu"))
    if t.can_compile():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(TargetUnavailable, match=r"needs tensorrt to compile.*pip install 'kdedge\[tensorrt\]'"):
        t.require("compile")
    from kdedge.targets.build import build_bundle
    from helpers_anytime import toy_bundle

    with pytest.raises(TargetUnavailable, match=r"kdedge\[tensorrt\]"):
        build_bundle(toy_bundle("fp32", False), "tensorrt")


@pytest.mark.tensorrt
def test_build_and_run_engines(tmp_path: Path) -> None:
    t = get_target("tensorrt")
    if not t.can_run():
        pytest.skip("TensorRT is not installed here (needs an NVIDIA GPU and its package index)")
    import shutil

    from helpers_anytime import toy_bundle
    from kdedge.targets.build import build_bundle

    copy = tmp_path / "t.kdedge"
    shutil.copytree(toy_bundle("fp32", False), copy)
    report = build_bundle(copy, "tensorrt", CompileSpec(precision="fp32", max_batch=16),
                          open_options=None)
    assert report["verified"] == "onnxruntime"
    assert all(r["passed"] for r in report["graphs"].values())
