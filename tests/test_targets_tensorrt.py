"""TensorRT: the parts that need no GPU (version selection, precision plans, profile shapes,
engine files and the refusal of engines built elsewhere, INT8 calibration rules and cache keys)
run everywhere, and so do the calibrator and the INT8 build driven with fake ``tensorrt`` and
CUDA runtime modules; building and running real engines needs TensorRT and an NVIDIA GPU (marked
``tensorrt``, skipped here with the reason)."""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdedge.targets import get_target
from kdedge.targets.base import CompileSpec, TargetError, TargetUnavailable
from kdedge.targets.tensorrt import (EngineMismatch, calibration_cache_path, check_calibration, check_engine_meta,
                                     jetpack_facts, onnx_is_qdq, precision_plan, profile_shapes, read_engine,
                                     timing_cache_path, trt_major, write_engine)

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


# ---------------------------------------------------------------------------------------------
# INT8 calibration, driven with fake `tensorrt` and CUDA runtime modules (no GPU here)


class FakeCudart:
    """cuda-python's runtime over host memory: cudaMalloc hands out ctypes buffers, cudaMemcpy
    copies into them, and every call is recorded."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.buffers: dict[int, Any] = {}
        self.mallocs: list[int] = []
        self.copies: list[tuple[int, int]] = []
        self.freed: list[int] = []

    def cudaMalloc(self, n: int) -> tuple[int, int]:  # noqa: N802
        buf = ctypes.create_string_buffer(n)
        ptr = ctypes.addressof(buf)
        self.buffers[ptr] = buf
        self.mallocs.append(n)
        return 0, ptr

    def cudaMemcpy(self, dst: int, src: int, n: int, kind: int) -> tuple[int]:  # noqa: N802
        assert kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        assert dst in self.buffers and n <= len(self.buffers[dst]), "copy outside an allocation"
        ctypes.memmove(dst, src, n)
        self.copies.append((dst, n))
        return (0,)

    def cudaFree(self, ptr: int) -> tuple[int]:  # noqa: N802
        assert ptr in self.buffers
        self.freed.append(ptr)
        return (0,)

    def read(self, ptr: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(self.buffers[ptr], np.float32, count=int(np.prod(shape))).reshape(shape).copy()


def fake_tensorrt(cudart: FakeCudart, version: str = "10.13.0.35") -> Any:
    """A `tensorrt` module with the builder API the target uses. Its builder drives an INT8
    calibrator the way TensorRT does: batch size, cache read, get_batch(network input names)
    until None (reading the device buffers at the calibration profile's OPT shape), cache write."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []

    class Logger:
        WARNING = 2

        def __init__(self, level: int = 2) -> None:
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.path = flags, [], None

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            import onnx

            self.network.path = path
            self.network.inputs = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
            return True

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

        def add_optimization_profile(self, p: Profile) -> None:
            self.profiles.append(p)

        def set_calibration_profile(self, p: Profile) -> None:
            self.calibration_profile = p

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            return TimingCache()

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> None:
            pass

        def get_timing_cache(self) -> TimingCache:
            return TimingCache()

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            cal = config.int8_calibrator
            rec = {"graph": Path(network.path).stem, "inputs": list(network.inputs), "flags": list(config.flags),
                   "calibrator": cal, "batch_size": None, "batches": [], "cache_read": None,
                   "calibration_profile": None if config.calibration_profile is None else
                   dict(config.calibration_profile.shapes)}
            if cal is not None:
                rec["batch_size"] = cal.get_batch_size()
                rec["cache_read"] = cache = cal.read_calibration_cache()
                if cache is None:
                    while (ptrs := cal.get_batch(list(network.inputs))) is not None:
                        assert len(ptrs) == len(network.inputs)
                        rec["batches"].append({n: cudart.read(p, rec["calibration_profile"][n][1])
                                               for n, p in zip(network.inputs, ptrs)})
                    cal.write_calibration_cache(memoryview(f"TRT-10-EntropyCalibration2 {rec['graph']}".encode()))
            trt.builds.append(rec)
            return b"\x00serialized-engine"

    for name, value in {"Logger": Logger, "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2, "Builder": Builder,
                        "OnnxParser": OnnxParser,
                        "NetworkDefinitionCreationFlag": types.SimpleNamespace(STRONGLY_TYPED=0),
                        "MemoryPoolType": types.SimpleNamespace(WORKSPACE=0),
                        "BuilderFlag": types.SimpleNamespace(FP16="FP16", INT8="INT8")}.items():
        setattr(trt, name, value)
    return trt


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Fake TensorRT 10 and CUDA installed: the tensorrt target compiles here (no sessions).
    HOME is a temporary directory: timing and calibration caches default to ~/.cache/kdedge."""
    import kdedge.targets.tensorrt as trtmod

    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trtmod.TensorRTTarget, "missing", lambda self, kind="compile": [])
    monkeypatch.setattr(trtmod.TensorRTTarget, "verify_here", lambda self: False)  # no sessions without a GPU
    monkeypatch.setattr(trtmod, "device_facts", lambda: dict(HERE))
    monkeypatch.setattr(trtmod, "_cudart", lambda: cudart)
    return types.SimpleNamespace(trt=trt, cudart=cudart)


@pytest.fixture(scope="module")
def calib_bundle():
    from helpers_anytime import toy_bundle

    return toy_bundle("fp32", True)


def _calib_set(path: Path, count: int = 48, batch: int = 16) -> Any:
    from helpers_anytime import digits
    from kdedge.runtime.bundle import open_bundle
    from kdedge.targets.calibration import calibration_set

    return calibration_set(open_bundle(path, targets=["onnx"]), digits()[2][:100], count=count, batch_size=batch)


def test_calibration_rules() -> None:
    check_calibration("int8", {"stage0": False}, True)
    check_calibration("fp16", {"stage0": False}, False)  # nothing given, nothing to refuse
    with pytest.raises(TargetError, match="used only to build int8 engines, this build is fp16"):
        check_calibration("fp16", {"stage0": False}, True)
    with pytest.raises(TargetError, match="INT8 QDQ .* needs no calibration; drop --calib"):
        check_calibration("int8", {"stage0": True, "prefix0": True}, True)
    check_calibration("int8", {"stage0": True, "stage1": False}, True)  # a graph kept FP32 in a QDQ bundle


def test_calibration_cache_key(tmp_path: Path) -> None:
    a = calibration_cache_path(tmp_path, "stage1", "a" * 64, "d" * 64, "10.13.0.35")
    assert a == calibration_cache_path(tmp_path, "stage1", "a" * 64, "d" * 64, "10.13.0.35")
    assert a.parent == tmp_path and a.name.startswith("calib-stage1-") and a.suffix == ".cache"
    others = {calibration_cache_path(tmp_path, "stage1", "b" * 64, "d" * 64, "10.13.0.35"),
              calibration_cache_path(tmp_path, "stage1", "a" * 64, "e" * 64, "10.13.0.35"),
              calibration_cache_path(tmp_path, "stage1", "a" * 64, "d" * 64, "10.8.0.43"),
              calibration_cache_path(tmp_path, "stage2", "a" * 64, "d" * 64, "10.13.0.35")}
    assert a not in others and len(others) == 4


def test_calibrator_feeds_one_pointer_per_name_in_order(calib_bundle, tmp_path: Path, monkeypatch) -> None:
    import kdedge.targets.tensorrt as trtmod
    from kdedge.targets.tensorrt import _calibrator

    cudart = FakeCudart()
    monkeypatch.setattr(trtmod, "_cudart", lambda: cudart)
    trt = fake_tensorrt(cudart)
    cs = _calib_set(calib_bundle)
    gb = cs.for_graph("stage2")
    want = list(gb)
    cache = tmp_path / "cache" / "calib-stage2.cache"
    cal = _calibrator(trt, gb, cache)
    assert isinstance(cal, trt.IInt8EntropyCalibrator2) and cal.base_initialised
    assert cal.get_batch_size() == 16 and cudart.mallocs == []  # fixed before the first batch, nothing allocated
    assert cal.read_calibration_cache() is None and not cal.cache_reused
    names = ["stage1__f1", "stage0__f0"]  # not the graph's order: pointers follow the names asked for
    for k in range(3):
        ptrs = cal.get_batch(names)
        assert len(ptrs) == 2 and ptrs[0] != ptrs[1]
        for n, p in zip(names, ptrs):
            np.testing.assert_array_equal(cudart.read(p, (16, 8, 8, 8)), want[k][n])
    assert sorted(cudart.mallocs) == [16 * 8 * 8 * 8 * 4] * 2  # one buffer per input, allocated once
    assert len(cudart.copies) == 6 and cal.fed == 3
    assert cal.get_batch(names) is None and cal.get_batch(names) is None  # end of data, and it stays there
    assert cal.error is None
    cal.write_calibration_cache(memoryview(b"TRT-table"))
    assert cache.read_bytes() == b"TRT-table" and [p.name for p in cache.parent.iterdir()] == [cache.name]
    assert cal.read_calibration_cache() == b"TRT-table" and cal.cache_reused
    cal.close()
    assert sorted(cudart.freed) == sorted(cudart.buffers)
    # a name the batches do not hold: the callback returns None and keeps the error for the build
    other = _calibrator(trt, gb, cache)
    assert other.get_batch(["input"]) is None
    assert isinstance(other.error, TargetError) and "asks for input(s) ['input']" in str(other.error)
    # a second calibrator over the same batches starts from the first batch again
    again = _calibrator(trt, gb, tmp_path / "other.cache")
    ptrs = again.get_batch(["stage0__f0", "stage1__f1"])
    np.testing.assert_array_equal(cudart.read(ptrs[0], (16, 8, 8, 8)), want[0]["stage0__f0"])
    cs.close()


def test_int8_build_calibrates_every_graph_on_its_own_inputs(calib_bundle, tmp_path: Path, fakes) -> None:
    import json
    import shutil

    from kdedge.runtime.bundle import open_bundle
    from kdedge.targets.build import build_bundle

    copy = tmp_path / "t.kdedge"
    shutil.copytree(calib_bundle, copy)
    cs = _calib_set(copy)
    caches = tmp_path / "caches"
    spec = CompileSpec(precision="int8", max_batch=32, options={"calibration": cs, "timing_cache_dir": str(caches)})
    report = build_bundle(copy, "tensorrt", spec, verify_n=0)
    graphs = [*cs.graph_names]
    builds = {b["graph"]: b for b in fakes.trt.builds}
    assert sorted(builds) == sorted(graphs)
    calibrators = [b["calibrator"] for b in builds.values()]
    assert len({id(c) for c in calibrators}) == len(graphs)  # one calibrator per graph
    for name, b in builds.items():
        gb = cs.for_graph(name)
        assert b["flags"] == ["INT8"] and b["batch_size"] == 16 and b["cache_read"] is None
        assert b["calibration_profile"] == {t: ((16, *s),) * 3 for t, s in zip(gb.inputs, gb.shapes)}
        want = list(gb)
        assert len(b["batches"]) == len(want) == 3
        for got, exp in zip(b["batches"], want):
            assert list(got) == list(gb.inputs)
            for t in got:
                np.testing.assert_allclose(got[t], exp[t], rtol=1e-6, atol=1e-6)
    assert sorted(fakes.cudart.freed) == sorted(fakes.cudart.buffers)  # every calibration buffer freed
    calib_files = sorted(p.name for p in caches.glob("calib-*.cache"))
    assert len(calib_files) == len(graphs)
    b = open_bundle(copy, targets=["onnx", "tensorrt"])
    for e in (*b.stages, *b.prefixes):
        rec = e.files["tensorrt"].extra["calibration"]
        assert rec["digest"] == cs.digest and rec["count"] == 48 and rec["batch_size"] == 16
        assert rec["graph_digest"] == cs.for_graph(e.name).digest and rec["cache"] in calib_files
        assert rec["batches_fed"] == 3 and rec["cache_reused"] is False
        meta, _ = read_engine(b.file(e, "tensorrt"))
        assert meta["calibration"] == cs.digest and meta["precision"] == "int8"
    assert report["calibration"] == cs.record() == {"kind": "array", "count": 48, "batch_size": 16,
                                                     "digest": cs.digest}
    prov = json.loads((copy / "manifest.json").read_text())["provenance"]["targets"]["tensorrt"]
    assert prov["calibration"] == cs.record()

    # the same data on another copy: every graph's table comes from the cache, no batch is read
    fakes.trt.builds.clear()
    copy2 = tmp_path / "t2.kdedge"
    shutil.copytree(calib_bundle, copy2)
    report2 = build_bundle(copy2, "tensorrt", CompileSpec(precision="int8", max_batch=32, options={
        "calibration": _calib_set(copy2), "timing_cache_dir": str(caches)}), verify_n=0)
    assert all(b["cache_read"] is not None and b["batches"] == [] for b in fakes.trt.builds)
    assert report2["calibration"]["digest"] == cs.digest
    entry = open_bundle(copy2, targets=["tensorrt"]).stages[1].files["tensorrt"].extra["calibration"]
    assert entry["cache_reused"] is True and entry["batches_fed"] == 0
    # other data: other keys, so a third build calibrates again
    fakes.trt.builds.clear()
    copy3 = tmp_path / "t3.kdedge"
    shutil.copytree(calib_bundle, copy3)
    build_bundle(copy3, "tensorrt", CompileSpec(precision="int8", max_batch=32, options={
        "calibration": _calib_set(copy3, count=32), "timing_cache_dir": str(caches)}), verify_n=0)
    assert all(b["cache_read"] is None and len(b["batches"]) == 2 for b in fakes.trt.builds)


def test_calibration_requests_refused_before_building(calib_bundle, tmp_path: Path, fakes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import shutil

    from kdedge.runtime.bundle import open_bundle
    from kdedge.targets.build import build_bundle, preflight

    copy = tmp_path / "t.kdedge"
    shutil.copytree(calib_bundle, copy)
    cs = _calib_set(copy)
    with pytest.raises(TargetError, match="needs calibration images"):  # TensorRT 10, FP32 bundle, none given
        build_bundle(copy, "tensorrt", CompileSpec(precision="int8"), verify_n=0)
    with pytest.raises(TargetError, match="used only to build int8 engines, this build is fp16"):
        build_bundle(copy, "tensorrt", CompileSpec(precision="fp16", options={"calibration": cs}), verify_n=0)
    with pytest.raises(TargetError, match=r"calibration batch 16 is outside the engine's batch range 1\.\.8"):
        build_bundle(copy, "tensorrt", CompileSpec(precision="int8", max_batch=8, options={"calibration": cs}),
                     verify_n=0)
    # a set made from other ONNX files (here: another stage0) does not calibrate this bundle
    from helpers_anytime import digits
    from kdedge.targets.calibration import calibration_set

    b = open_bundle(copy, targets=["onnx"])
    s0 = b.stages[0]
    s0 = dataclasses.replace(s0, files={"onnx": dataclasses.replace(s0.files["onnx"], sha256="0" * 64)})
    foreign = calibration_set(dataclasses.replace(b, stages=(s0, *b.stages[1:])), digits()[2][:32], batch_size=16)
    with pytest.raises(TargetError, match="computed with the ONNX files of"):
        build_bundle(copy, "tensorrt", CompileSpec(precision="int8", options={"calibration": foreign}), verify_n=0)
    # a QDQ bundle: every graph's ONNX is int8

    def as_int8(e: Any) -> Any:
        return dataclasses.replace(e, files={**e.files, "onnx": dataclasses.replace(e.files["onnx"], precision="int8")})

    qdq = dataclasses.replace(b, stages=tuple(map(as_int8, b.stages)), prefixes=tuple(map(as_int8, b.prefixes)))
    with pytest.raises(TargetError, match="INT8 QDQ .* needs no calibration"):
        preflight(qdq, "tensorrt", CompileSpec(precision="int8"), 16)
    preflight(qdq, "tensorrt", CompileSpec(precision="int8"), None)
    # TensorRT 11 has no calibrator: its message, before any image is read
    monkeypatch.setattr(fakes.trt, "__version__", "11.0.0")
    with pytest.raises(TargetError, match="TensorRT 11 builds INT8 only from a QDQ ONNX"):
        preflight(b, "tensorrt", CompileSpec(precision="int8"), 16)
    assert fakes.trt.builds == [] and not list(copy.glob("tensorrt"))


def _cli(*args: object) -> Any:
    from typer.testing import CliRunner

    from kdedge.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _cli_error(res: Any, needle: str) -> None:
    """Exit 2 and one error line (after progress lines, if any)."""
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert "Traceback" not in res.output and [ln for ln in lines if ln.startswith("error:")] == lines[-1:], res.output
    assert needle in lines[-1], res.output


def test_cli_without_tensorrt_says_what_to_install(calib_bundle, tmp_path: Path) -> None:
    if get_target("tensorrt").can_compile():
        pytest.skip("TensorRT is installed here")
    np.save(tmp_path / "x.npy", np.zeros((16, 1, 8, 8), np.float32))
    _cli_error(_cli("build", calib_bundle, "--target", "tensorrt", "--precision", "int8", "--calib",
                    tmp_path / "x.npy"), "needs tensorrt to compile")


def test_cli_calibrated_build_and_bad_calibration_images(calib_bundle, tmp_path: Path, fakes) -> None:
    import json
    import shutil

    from helpers_anytime import digits

    copy = tmp_path / "t.kdedge"
    shutil.copytree(calib_bundle, copy)
    base = ("build", copy, "--target", "tensorrt", "--precision", "int8")
    _cli_error(_cli(*base, "--calib", tmp_path / "nope"), "calibration images: input")
    np.save(tmp_path / "rgb.npy", np.zeros((16, 3, 8, 8), np.float32))
    _cli_error(_cli(*base, "--calib", tmp_path / "rgb.npy"), "has 3 channel(s)")
    np.save(tmp_path / "few.npy", digits()[2][:8])
    _cli_error(_cli(*base, "--calib", tmp_path / "few.npy"), "at least one full batch of 32 images, the source has 8")
    _cli_error(_cli(*base, "--calib", tmp_path / "few.npy", "--calib-batch", "128"),
               "calibration batch 128 is outside the engine's batch range 1..64")
    assert fakes.trt.builds == []
    np.save(tmp_path / "x.npy", digits()[2][:100])
    res = _cli(*base, "--calib", tmp_path / "x.npy", "--calib-count", "40", "--calib-batch", "8", "--verify-n", "0",
               "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["calibration"]["kind"] == "path" and report["calibration"]["count"] == 40
    assert report["calibration"]["batch_size"] == 8 and report["calibration"]["available"] == 100
    assert len(fakes.trt.builds) == 6 and all(len(b["batches"]) == 5 for b in fakes.trt.builds)
    assert len(list((tmp_path / "home" / ".cache" / "kdedge" / "tensorrt").glob("calib-*.cache"))) == 6
    # from the data layer (digits: the bundle was exported without a run, so seed 0)
    fakes.trt.builds.clear()
    copy2 = tmp_path / "t2.kdedge"
    shutil.copytree(calib_bundle, copy2)
    res = _cli("build", copy2, "--target", "tensorrt", "--precision", "int8", "--calib-data", "digits",
               "--calib-count", "32", "--verify-n", "0", "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)["calibration"]
    assert {k: rec[k] for k in ("kind", "name", "split", "seed", "count", "batch_size")} == {
        "kind": "dataset", "name": "digits", "split": "train", "seed": 0, "count": 32, "batch_size": 32}
    assert all(len(b["batches"]) == 1 for b in fakes.trt.builds)
