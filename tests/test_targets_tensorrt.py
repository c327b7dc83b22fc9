"""TensorRT: the parts that need no GPU (version selection, precision plans, profile shapes,
engine files and the refusal of engines built elsewhere, INT8 calibration rules and cache keys)
run everywhere, and so do the builds, the calibrator and the sessions on the emulated TensorRT
and CUDA runtime of ``tests/fake_tensorrt.py`` (device buffers, carried tensors, copies,
streams, CUDA graphs, lifetimes, threads); building and running real engines needs TensorRT and
an NVIDIA GPU (marked ``tensorrt``, skipped here with the reason)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_tensorrt import HERE, FakeCudart, fake_tensorrt, install

from kdedge.targets import get_target
from kdedge.targets.base import CompileSpec, TargetError, TargetUnavailable
from kdedge.targets.tensorrt import (
    EngineMismatch,
    calibration_cache_path,
    check_calibration,
    check_engine_meta,
    graph_precisions,
    jetpack_facts,
    onnx_is_qdq,
    precision_plan,
    profile_shapes,
    read_engine,
    timing_cache_path,
    trt_major,
    write_engine,
)


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
    from helpers_anytime import toy_bundle

    from kdedge.targets.build import build_bundle

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
# INT8 calibration, driven with the emulated `tensorrt` and CUDA runtime (no GPU here)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The emulated TensorRT 10 and CUDA runtime installed (tests/fake_tensorrt.py): the tensorrt
    target compiles and runs here. HOME is a temporary directory: timing and calibration caches
    default to ~/.cache/kdedge."""
    return install(monkeypatch, tmp_path / "home")


@pytest.fixture(scope="module")
def calib_bundle():
    from helpers_anytime import toy_bundle

    return toy_bundle("fp32", True)


def _calib_set(path: Path, count: int = 48, batch: int = 16) -> Any:
    from helpers_anytime import digits

    from kdedge.targets import open_bundle
    from kdedge.targets.calibration import calibration_set

    return calibration_set(open_bundle(path, targets=["onnx"]), digits()[2][:100], count=count, batch_size=batch)


def test_calibration_rules() -> None:
    check_calibration("int8", {"stage0": False}, True)
    check_calibration("fp16", {"stage0": False}, False)  # nothing given, nothing to refuse
    with pytest.raises(TargetError, match="used only to build int8 engines, this build is fp16"):
        check_calibration("fp16", {"stage0": False}, True)
    with pytest.raises(TargetError, match="INT8 QDQ .* needs no calibration; drop --calib"):
        check_calibration("int8", {"stage0": True, "prefix0": True}, True)
    check_calibration("int8", {"stage0": True, "stage1": False}, True)  # stage1 is plain FP32: calibrated
    with pytest.raises(TargetError, match=r"no graph of this bundle needs calibration.*kept FP32 \(stage1\)"):
        check_calibration("int8", {"stage0": True, "stage1": False}, True, kept=("stage1",))
    assert graph_precisions("int8", {"stage0": True, "stage1": False}, kept=("stage1",)) == {"stage0": "int8",
                                                                                            "stage1": "fp32"}
    assert graph_precisions("int8", {"stage0": False}) == {"stage0": "int8"}  # FP32 bundle: calibrated to INT8
    assert graph_precisions("fp16", {"stage0": True, "stage1": False}, kept=("stage1",)) == {"stage0": "fp16",
                                                                                            "stage1": "fp16"}


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
    import kdedge.targets.tensorrt.cuda as trtmod
    from kdedge.targets.tensorrt.calibrator import _calibrator

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

    from kdedge.targets import open_bundle
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

    from kdedge.targets import open_bundle
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


# ---------------------------------------------------------------------------------------------
# The real session code on the emulated TensorRT and CUDA runtime (tests/fake_tensorrt.py): device
# buffers, carried tensors, streams, CUDA graphs, lifetimes and threads. It proves the
# orchestration, not TensorRT's numerics or the real bindings' argument types.


@pytest.fixture(scope="module")
def emu_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy bundle with emulated TensorRT 10 engines for batches 1..16 (verified in the build)."""
    import shutil

    from helpers_anytime import toy_bundle

    from kdedge.targets.build import build_bundle

    out = tmp_path_factory.mktemp("emu") / "toy.kdedge"
    shutil.copytree(toy_bundle("fp32", True), out)
    with pytest.MonkeyPatch.context() as mp:
        install(mp, tmp_path_factory.mktemp("home"))
        report = build_bundle(out, "tensorrt", CompileSpec(precision="fp32", max_batch=16))
    assert report["verified"] == "onnxruntime" and all(r["passed"] for r in report["graphs"].values())
    return out


def _x(n: int, start: int = 0) -> np.ndarray:
    from helpers_anytime import digits

    return digits()[2][start:start + n]


def _ref(bundle: Path, x: np.ndarray, policy: Any = None) -> Any:
    from kdedge.runtime.runner import Runner

    with Runner(bundle, target="onnx", threads=1) as r:
        return r.run(x, policy)


def _sessions(bundle: Path, **options: Any) -> tuple[Any, list[Any]]:
    from kdedge.targets import open_bundle

    b = open_bundle(bundle, targets=["tensorrt"])
    t = get_target("tensorrt")
    return b, [t.open_entry(b, e, options) for e in b.stages]


def test_the_emulation_catches_misuse(emu_bundle: Path, fakes) -> None:
    """The fakes fail where a GPU would crash or compute garbage (so the tests below can fail)."""
    from fake_tensorrt import EmulationError

    cu = fakes.cudart
    host = np.ones(4, np.float32)
    _, dev = cu.cudaMalloc(16)
    with pytest.raises(EmulationError, match="is a device address .*not host memory"):
        cu.cudaMemcpy(host.ctypes.data, dev, 16, cu.cudaMemcpyKind.cudaMemcpyHostToDevice)  # swapped arguments
    with pytest.raises(EmulationError, match="run past the end"):
        cu.cudaMemcpy(dev, np.ones(8, np.float32).ctypes.data, 32, cu.cudaMemcpyKind.cudaMemcpyHostToDevice)
    cu.cudaFree(dev)
    with pytest.raises(EmulationError, match="use after free"):
        cu.cudaMemcpy(host.ctypes.data, dev, 16, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    with pytest.raises(EmulationError, match="freed twice"):
        cu.cudaFree(dev)
    # an engine runs when its stream runs; a graph replays the addresses bound at capture time
    _, blob = read_engine(emu_bundle / "tensorrt" / "prefix0.plan")
    engine = fakes.trt.Runtime(fakes.trt.Logger()).deserialize_cuda_engine(blob)
    ctx = engine.create_execution_context()
    assert ctx.get_tensor_shape("prefix0__logits") == (-1, 10)  # unknown until the input shape is set
    assert ctx.set_input_shape("input", (2, 1, 8, 8)) and ctx.get_tensor_shape("prefix0__logits") == (2, 10)
    assert not ctx.set_input_shape("input", (17, 1, 8, 8))  # outside the profile 1..16
    _, s = cu.cudaStreamCreate()
    x = np.ascontiguousarray(_x(2))
    ptrs = {t: cu.cudaMalloc(n)[1] for t, n in (("in", x.nbytes), ("a", 80), ("b", 80))}
    cu.cudaMemcpy(ptrs["in"], x.ctypes.data, x.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice)
    ctx.set_tensor_address("input", ptrs["in"])
    assert not ctx.execute_async_v3(s)  # an output without an address
    ctx.set_tensor_address("prefix0__logits", ptrs["a"])
    assert ctx.execute_async_v3(s)
    assert not cu.read(ptrs["a"], (2, 10)).any()  # enqueued, not run
    cu.cudaStreamSynchronize(s)
    want = cu.read(ptrs["a"], (2, 10))
    assert want.any()
    cu.cudaStreamBeginCapture(s, cu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    ctx.execute_async_v3(s)
    _, graph = cu.cudaStreamEndCapture(s)
    _, exe = cu.cudaGraphInstantiate(graph, 0)
    ctx.set_tensor_address("prefix0__logits", ptrs["b"])  # too late: the graph keeps "a"
    cu.cudaGraphLaunch(exe, s)
    cu.cudaStreamSynchronize(s)
    assert not cu.read(ptrs["b"], (2, 10)).any()
    with pytest.raises(EmulationError, match="is a host address"):
        ctx.set_tensor_address("input", x.ctypes.data)
        ctx.execute_async_v3(s)
    # a capture forbids unsafe calls: from every thread in global mode
    cu.cudaStreamBeginCapture(s, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
    assert cu.cudaMalloc(4)[0] == 900
    assert cu.cudaStreamEndCapture(s)[0] == 901  # and the capture is invalidated


def test_carried_tensors_never_visit_the_host(emu_bundle: Path, fakes) -> None:
    from kdedge.runtime.runner import Runner
    from kdedge.targets.tensorrt import DeviceTensor

    x = _x(8)
    with Runner(emu_bundle, target="tensorrt") as r:
        r.run(x)  # first call: buffers allocated
        before = dict(fakes.cudart.counts)
        res = r.run(x)
        got = {k: fakes.cudart.counts[k] - before[k] for k in ("h2d", "d2h", "d2d")}
        assert got == {"h2d": 1, "d2h": 3, "d2d": 0}  # the input in, each stage's logits out; f0/f1 stay
        np.testing.assert_allclose(res.probs, _ref(emu_bundle, x).probs, atol=1e-5)
        out = r.sessions[0].run({"input": x})
        assert isinstance(out["stage0__logits"], np.ndarray) and isinstance(out["stage0__f0"], DeviceTensor)


def test_buffers_are_bound_once_per_batch_size(emu_bundle: Path, fakes) -> None:
    from kdedge.runtime.runner import Runner

    cu = fakes.cudart
    with Runner(emu_bundle, target="tensorrt") as r:
        r.run(_x(8))
        n = len(cu.mallocs)
        for k in range(3):
            res = r.run(_x(8, 8 * k))
            np.testing.assert_allclose(res.probs, _ref(emu_bundle, _x(8, 8 * k)).probs, atol=1e-5)
        assert len(cu.mallocs) == n  # no cudaMalloc on repeated calls
        r.run(_x(3))
        m = len(cu.mallocs)
        assert m > n
        r.run(_x(3, 5))
        r.run(_x(8))
        assert len(cu.mallocs) == m


def test_a_batch_outside_the_profile_is_refused(emu_bundle: Path, fakes) -> None:
    from kdedge.runtime.runner import Runner

    with Runner(emu_bundle, target="tensorrt") as r:
        with pytest.raises(TargetError, match=r"batch 17 is outside the engine's profile \(1, 16\).*--max-batch"):
            r.run(np.zeros((17, 1, 8, 8), np.float32))
        assert fakes.trt.executions == []
        s = r.sessions[0]
        with pytest.raises(TargetError, match="input shape"):
            s.run({"input": np.zeros((2, 1, 9, 9), np.float32)})  # TensorRT refuses the shape
        np.testing.assert_allclose(r.run(_x(4)).probs, _ref(emu_bundle, _x(4)).probs, atol=1e-5)


def test_cuda_graphs_are_captured_once_per_batch_and_addresses_and_replayed(emu_bundle: Path, fakes) -> None:
    from kdedge.runtime.runner import Runner

    cu = fakes.cudart
    with Runner(emu_bundle, target="tensorrt", cuda_graphs=True) as r:
        assert r.run_key == "tensorrt-cuda-cudagraphs"
        for k in range(4):  # new inputs each time: a replay reads the bound buffers' new contents
            x = _x(4, 4 * k)
            np.testing.assert_allclose(r.run(x).probs, _ref(emu_bundle, x).probs, atol=1e-5)
            if k == 0:
                assert cu.counts["graphs_instantiated"] == 3  # one per stage
        assert cu.counts["graphs_instantiated"] == 3 and cu.counts["graph_launches"] == 12
        assert sum(e["captured"] for e in fakes.trt.executions) == 3
        r.run(_x(2))
        assert cu.counts["graphs_instantiated"] == 6  # a new batch size: new graphs
        assert cu.counts["graphs_destroyed"] == 6  # the captured graph is dropped once instantiated
        # the confidence policy: some samples leave after stage 0, the rest run on a smaller batch
        from kdedge.runtime.policies import make_policy

        x = _x(16)
        pol = make_policy(confidence=0.3)
        got, want = r.run(x, pol), _ref(emu_bundle, x, pol)
        np.testing.assert_array_equal(got.stage, want.stage)
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-5)
        assert len(set(got.stage.tolist())) > 1


def test_a_carried_tensor_belongs_to_its_call(emu_bundle: Path, fakes) -> None:
    """A second call of a stage does not overwrite what the first returned (the next stage may
    not have read it yet: another thread's request, or a caller that keeps outputs)."""
    from kdedge.targets.build import _chain

    b, (s0, s1, s2) = _sessions(emu_bundle)
    onnx = get_target("onnx")
    ref = [onnx.open_entry(b, e, None) for e in b.stages]
    xa, xb = _x(4), _x(4, 4)
    s0.run({"input": xb})  # warm: a buffer set is allocated, and back in the pool
    mallocs = len(fakes.cudart.mallocs)
    a = s0.run({"input": xa})
    assert len(fakes.cudart.mallocs) == mallocs  # the pooled set is reused...
    b_out = s0.run({"input": xb})  # ...but not while `a` holds it: same batch size, other buffers
    assert b_out["stage0__f0"].ptr != a["stage0__f0"].ptr
    got = s1.run({"stage0__f0": a["stage0__f0"]})
    want = _chain(ref, b.stages, xa)
    np.testing.assert_allclose(got["stage1__logits"], want["stage1__logits"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(a["stage0__f0"]), want["stage0__f0"], atol=1e-5)
    mallocs = len(fakes.cudart.mallocs)
    del a, b_out, got  # both sets go back to the pool
    s0.run({"input": xa})
    s0.run({"input": xb})
    assert len(fakes.cudart.mallocs) == mallocs
    for s in (s0, s1, s2):
        s.close()


def test_a_stage_without_host_outputs_is_complete_when_it_returns(emu_bundle: Path, fakes) -> None:
    """Every stage runs on its own stream: what one returns must be computed before the next
    stage's stream reads it (here no host copy synchronizes stage 0)."""
    from kdedge.targets.build import _chain

    b, (s0, s1, s2) = _sessions(emu_bundle)
    all_carried = get_target("tensorrt").open_entry(b, b.stages[0], {"host_outputs": ()})
    x = _x(4, 12)
    out = all_carried.run({"input": x})
    assert fakes.cudart.counts["d2h"] == 0
    got = s1.run({"stage0__f0": out["stage0__f0"]})
    want = _chain([get_target("onnx").open_entry(b, e, None) for e in b.stages], b.stages, x)
    np.testing.assert_allclose(got["stage1__logits"], want["stage1__logits"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["stage0__logits"]), want["stage0__logits"], atol=1e-5)
    for s in (all_carried, s0, s1, s2):
        s.close()


def _threads(*targets: Any) -> list[Any]:
    import threading

    errors: list[BaseException] = []

    def wrap(f: Any) -> Any:
        def run() -> None:
            try:
                f()
            except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
                errors.append(e)
        return run

    ts = [threading.Thread(target=wrap(f), name=name) for name, f in targets]
    return [ts, errors]


def test_two_threads_through_one_runner_keep_their_carried_tensors(emu_bundle: Path, fakes) -> None:
    """Thread A has run stage 0 and is in stage 1 when thread B runs stage 0 on other images."""
    import threading

    from kdedge.runtime.runner import Runner

    xa, xb = _x(4), _x(4, 20)
    a_waits, b_done0 = threading.Event(), threading.Event()
    res: dict[str, Any] = {}
    with Runner(emu_bundle, target="tensorrt") as r:
        r.run(xb)  # warm: the buffer sets are in the pools
        s0 = r.sessions[0]
        run0 = s0.run

        def spy(inputs: Any, abort: Any = None) -> Any:
            out = run0(inputs, abort)
            if threading.current_thread().name == "B":
                b_done0.set()
            return out

        s0.run = spy

        def hook(ctx: Any, captured: bool) -> None:
            if ctx.engine.name == "stage1" and threading.current_thread().name == "A" and not b_done0.is_set():
                a_waits.set()
                assert b_done0.wait(10)

        fakes.trt.on_execute = hook
        ts, errors = _threads(("A", lambda: res.__setitem__("A", r.run(xa))),
                              ("B", lambda: (a_waits.wait(10), res.__setitem__("B", r.run(xb)))))
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        if errors:
            raise errors[0]
    assert b_done0.is_set()  # the interleaving happened
    np.testing.assert_allclose(res["A"].probs, _ref(emu_bundle, xa).probs, atol=1e-5)
    np.testing.assert_allclose(res["B"].probs, _ref(emu_bundle, xb).probs, atol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_many_requests_from_two_threads(emu_bundle: Path, fakes, graphs: bool) -> None:
    from kdedge.runtime.policies import make_policy
    from kdedge.runtime.runner import Runner

    policies = [None, make_policy(stages=2), make_policy(confidence=0.3), make_policy(stages=2, fused=True)]
    jobs = [(_x(n, 3 * i), policies[i % 4]) for i, n in enumerate((4, 4, 8, 4, 8, 8, 4, 2, 4, 8, 4, 4))]
    want = [_ref(emu_bundle, x, p) for x, p in jobs]
    got: dict[int, Any] = {}
    with Runner(emu_bundle, target="tensorrt", cuda_graphs=graphs) as r:
        def worker(part: int) -> Any:
            return lambda: [got.__setitem__(i, r.run(x, p)) for i, (x, p) in enumerate(jobs) if i % 2 == part]

        ts, errors = _threads(("A", worker(0)), ("B", worker(1)))
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        if errors:
            raise errors[0]
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[i].stage, w.stage)
        np.testing.assert_allclose(got[i].probs, w.probs, atol=1e-5)
    assert fakes.cudart.leaks() == {"allocations": 0, "streams": 0, "graph_execs": 0}


def test_a_capture_leaves_other_threads_cuda_calls_alone(emu_bundle: Path, fakes) -> None:
    """While one thread captures a stage's graph, another allocates, copies and reads a carried
    tensor of the same session (it waits for the capture; it does not break it)."""
    import threading

    b, (s0, s1, s2) = _sessions(emu_bundle, cuda_graphs=True)
    carried = s0.run({"input": _x(2)})["stage0__f0"]
    want = np.asarray(carried)
    seen: dict[str, Any] = {}

    def other() -> None:
        seen["malloc"] = fakes.cudart.cudaMalloc(64)[0]
        seen["f0"] = np.asarray(carried)

    def hook(ctx: Any, captured: bool) -> None:
        if captured and "thread" not in seen:
            seen["thread"] = t = threading.Thread(target=other)
            t.start()
            t.join(0.5)  # reading the carried tensor has to wait for the capture to end

    fakes.trt.on_execute = hook
    out = s0.run({"input": _x(4)})  # a new batch size: captured now
    seen["thread"].join(10)
    assert seen["malloc"] == 0
    np.testing.assert_array_equal(seen["f0"], want)
    want0 = get_target("onnx").open_entry(b, b.stages[0], None).run({"input": _x(4)})["stage0__logits"]
    np.testing.assert_allclose(out["stage0__logits"], want0, atol=1e-5)
    for s in (s0, s1, s2):
        s.close()


def test_close_frees_everything(emu_bundle: Path, fakes) -> None:
    from kdedge.runtime.policies import make_policy
    from kdedge.runtime.runner import Runner

    cu = fakes.cudart
    with Runner(emu_bundle, target="tensorrt", cuda_graphs=True) as r:
        for n in (1, 4):
            r.run(_x(n))
        r.run(_x(4), make_policy(stages=3, fused=True))
        carried = r.sessions[0].run({"input": _x(2)})["stage0__f0"]
        assert cu.leaks()["allocations"] > 0 and cu.leaks()["graph_execs"] > 0
    assert cu.leaks() == {"allocations": 0, "streams": 0, "graph_execs": 0}
    assert cu.counts["streams_destroyed"] == cu.counts["streams_created"] == 4  # 3 stages + 1 prefix
    with pytest.raises(TargetError, match="closed"):
        np.asarray(carried)  # its memory is gone with the session
    del carried  # a late release after close is harmless


def test_runner_and_cli_take_cuda_graphs_for_tensorrt(emu_bundle: Path, fakes, tmp_path: Path) -> None:
    import json
    import shutil

    from kdedge.runtime.runner import Runner
    from kdedge.targets import RunSpec

    t = get_target("tensorrt")
    assert t.caps.cuda_graphs and t.info()["cuda_graphs"] is True
    assert t.session_options(RunSpec(cuda_graphs=True)) == {"cuda_graphs": True}
    assert t.session_options(RunSpec()) == {} and t.run_key(RunSpec()) == "tensorrt-cuda"
    with pytest.raises(TargetError, match="takes no device index"):
        Runner(emu_bundle, target="tensorrt", device="cuda:1")
    with Runner(emu_bundle, target="tensorrt", cuda_graphs=True) as r:
        assert r.options == {"cuda_graphs": True} and r.run_key == "tensorrt-cuda-cudagraphs"
    copy = tmp_path / "p.kdedge"
    shutil.copytree(emu_bundle, copy)
    res = _cli("profile", copy, "--target", "tensorrt", "--cuda-graphs", "--batch", "1,4", "--runs", "3",
               "--warmup", "1", "--no-plot", "--json")
    assert res.exit_code == 0, res.output
    files = [p.name for p in (copy / "profiles").glob("*.json")]
    assert len(files) == 1 and files[0].endswith("-tensorrt-cuda-cudagraphs.json"), files
    data = json.loads((copy / "profiles" / files[0]).read_text())
    assert data["run_key"] == "tensorrt-cuda-cudagraphs" and data["options"] == {"cuda_graphs": True}
    assert fakes.cudart.counts["graph_launches"] > 0
    np.save(tmp_path / "x.npy", _x(4))
    res = _cli("run", copy, "--target", "tensorrt", "--cuda-graphs", "--input", tmp_path / "x.npy",
               "--deadline-ms", "1000", "--json")
    assert res.exit_code == 0, res.output
    assert res.output.count('"budget_met": true') == 4


def test_fp16_engines_are_verified_at_fp16_tolerance(tmp_path: Path, fakes) -> None:
    import shutil

    from helpers_anytime import toy_bundle

    from kdedge.runtime.runner import Runner
    from kdedge.targets import open_bundle
    from kdedge.targets.build import build_bundle

    copy = tmp_path / "h.kdedge"
    shutil.copytree(toy_bundle("fp32", True), copy)
    report = build_bundle(copy, "tensorrt", CompileSpec(precision="fp16", max_batch=8))
    assert report["verified"] == "onnxruntime" and all(r["atol"] == 2e-2 for r in report["graphs"].values())
    worst = max(r["worst_ratio"] for r in report["graphs"].values())
    assert 0 < worst <= 1  # the emulated FP16 rounding shows, within the fp16 tolerance
    b = open_bundle(copy, targets=["tensorrt"])
    assert {e.files["tensorrt"].precision for e in (*b.stages, *b.prefixes)} == {"fp16"}
    assert all(r["flags"] == ["FP16"] for r in fakes.trt.builds)
    x = _x(8)
    with Runner(copy, target="tensorrt") as r:
        res = r.run(x)
        assert res.probs.dtype == np.float64
        np.testing.assert_allclose(res.probs, _ref(copy, x).probs, atol=2e-2)


def test_the_fake_cuda_runtime_has_the_signatures_of_cuda_python() -> None:
    """The cudart calls the target makes exist in an installed cuda-python with the same
    parameters (names only: the emulation cannot prove the argument types)."""
    import re

    try:
        from cuda.bindings import runtime as real
    except ImportError:
        pytest.skip("cuda-python (cuda.bindings) is not installed here")
    import inspect

    import kdedge.targets.tensorrt as trtmod

    source = "".join(p.read_text() for p in sorted(Path(trtmod.__file__).parent.glob("*.py")))  # the whole package
    used = sorted(set(re.findall(r"cudart\.(cuda[A-Za-z]+)\(", source)))
    assert "cudaStreamDestroy" in used and "cudaGraphExecDestroy" in used
    fake = FakeCudart()
    for name in used:
        doc = (getattr(real, name).__doc__ or "").strip().splitlines()[0]
        params = [p.strip().split(":")[0].split(" ")[-1] for p in doc[doc.index("(") + 1:doc.rindex(")")].split(",")
                  if p.strip()]
        mine = [p for p in inspect.signature(getattr(fake, name)).parameters]
        assert len(mine) == len(params), (name, params, mine)
    assert int(real.cudaMemcpyKind.cudaMemcpyHostToDevice) == FakeCudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    assert int(real.cudaMemcpyKind.cudaMemcpyDeviceToHost) == FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    mode = real.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert int(mode) == FakeCudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal


# ---------------------------------------------------------------------------------------------
# An INT8 bundle whose export kept some graphs FP32 (the INT8 accuracy gate, keep_fp32)

KEPT = ("stage2", "prefix2")


def _insert_qdq(path: Path) -> None:
    """Put a QuantizeLinear/DequantizeLinear pair (int8, symmetric) on the graph's first input:
    a QDQ graph that onnxruntime and the emulated TensorRT both run."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    name = g.input[0].name
    for node in g.node:
        for i, v in enumerate(node.input):
            if v == name:
                node.input[i] = f"{name}_dq"
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "qdq_scale"),
                          numpy_helper.from_array(np.array(0, np.int8), "qdq_zero")])
    g.node.insert(0, helper.make_node("QuantizeLinear", [name, "qdq_scale", "qdq_zero"], [f"{name}_q"]))
    g.node.insert(1, helper.make_node("DequantizeLinear", [f"{name}_q", "qdq_scale", "qdq_zero"], [f"{name}_dq"]))
    onnx.save(m, str(path))


@pytest.fixture(scope="module")
def kept_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy bundle as a --precision int8 export whose gate kept stage2 and prefix2 FP32: their
    ONNX has no Q/DQ nodes and their manifest precision is fp32; the other graphs are QDQ."""
    import json
    import shutil

    from helpers_anytime import toy_bundle

    from kdedge.bundle.writer import file_entry
    from kdedge.targets import open_bundle

    out = tmp_path_factory.mktemp("kept") / "toy-int8.kdedge"
    shutil.copytree(toy_bundle("fp32", True), out)
    m = json.loads((out / "manifest.json").read_text())
    for e in (*m["stages"], *m["prefixes"]):
        if e["name"] in KEPT:
            continue
        f = e["files"]["onnx"]
        _insert_qdq(out / f["path"])
        e["files"]["onnx"] = {**f, **file_entry(out, f["path"]), "precision": "int8"}
    m["quantization"] = {"precision": "int8", "format": "QDQ", "scheme": "s8s8", "calibration": "minmax",
                         "n_calibration": 128, "max_drop": 1.0, "keep_fp32": True, "fp32_graphs": list(KEPT)}
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    open_bundle(out)  # still a valid bundle
    return out


@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0"])
def test_graphs_the_export_kept_fp32_are_built_fp32(kept_bundle: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    import json
    import shutil

    from kdedge.runtime.runner import Runner
    from kdedge.targets import open_bundle

    f = install(monkeypatch, tmp_path / "home", version=version)
    copy = tmp_path / "k.kdedge"
    shutil.copytree(kept_bundle, copy)
    res = _cli("build", copy, "--target", "tensorrt", "--precision", "int8")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "stage2" in ln]
    assert len(lines) == 1 and "stage2, prefix2" in lines[0] and "fp32" in lines[0], res.output
    builds = {b["graph"]: b for b in f.trt.builds}
    assert sorted(builds) == ["prefix0", "prefix1", "prefix2", "stage0", "stage1", "stage2"]
    for name, b in builds.items():
        assert b["error"] is None and b["calibrator"] is None
        if version.startswith("10"):
            assert b["flags"] == ([] if name in KEPT else ["INT8", "FP16"]) and not b["strongly_typed"]
        else:
            assert b["flags"] == [] and b["strongly_typed"]
    bundle = open_bundle(copy, targets=["onnx", "tensorrt"])
    for e in (*bundle.stages, *bundle.prefixes):
        want = "fp32" if e.name in KEPT else "int8"
        assert e.files["tensorrt"].precision == want == e.files["onnx"].precision
        assert read_engine(bundle.file(e, "tensorrt"))[0]["precision"] == want
        assert e.files["tensorrt"].extra["verified"] == "onnxruntime"
    prov = json.loads((copy / "manifest.json").read_text())["provenance"]["targets"]["tensorrt"]
    assert prov["fp32_graphs"] == list(KEPT)
    x = _x(8)
    with Runner(copy, target="tensorrt") as r:  # TensorRT 10's FP16 flag: emulated FP16 rounding
        np.testing.assert_allclose(r.run(x).probs, _ref(copy, x).probs, atol=1e-2)


def test_calibration_is_refused_when_every_graph_is_qdq_or_kept_fp32(kept_bundle: Path, tmp_path: Path, fakes) -> None:
    import shutil

    from kdedge.targets import open_bundle
    from kdedge.targets.build import preflight

    copy = tmp_path / "k.kdedge"
    shutil.copytree(kept_bundle, copy)
    np.save(tmp_path / "x.npy", _x(64))
    _cli_error(_cli("build", copy, "--target", "tensorrt", "--precision", "int8", "--calib",
                    tmp_path / "x.npy"), "no graph of this bundle needs calibration")
    b = open_bundle(kept_bundle, targets=["onnx"])
    with pytest.raises(TargetError, match=r"kept FP32 \(stage2, prefix2\) are built FP32"):
        preflight(b, "tensorrt", CompileSpec(precision="int8"), 16)
    preflight(b, "tensorrt", CompileSpec(precision="int8"), None)
    assert fakes.trt.builds == []
    # an FP32 build of the same bundle: every graph fp32, nothing said about kept graphs
    check_calibration("fp32", {"stage0": True, "stage2": False}, False, kept=KEPT)
