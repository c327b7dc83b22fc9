"""The target registry, capabilities as data, refusals, and the fake target driving
``kdedge build``, the runner and the watchdog without any hardware."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers_anytime import digits, toy_bundle

from kdedge.runtime.runner import Runner
from kdedge.targets import TARGETS, format_table, get_target, open_bundle, pick_target, target_table
from kdedge.targets.base import CompileSpec, TargetError
from kdedge.targets.build import build_bundle
from kdedge.targets.session import StageAborted


def test_registry_and_table() -> None:
    table = target_table()
    assert list(table) == list(TARGETS) == ["onnx", "torch", "coreml", "tensorrt"]
    assert table["onnx"]["compile"] and table["onnx"]["run"] and table["torch"]["run"]
    assert table["coreml"]["run"] is (sys.platform == "darwin")
    assert table["onnx"]["can_abort"] is True and table["torch"]["can_abort"] is False
    text = format_table()
    for name in TARGETS:
        assert f"\n{name} " in text
    with pytest.raises(TargetError, match="unknown target 'tflite'; known: onnx, torch, coreml, tensorrt"):
        get_target("tflite")


def test_importing_the_registry_needs_no_torch() -> None:
    code = ("import sys, kdedge.targets as t; t.get_target('onnx'); t.get_target('tensorrt'); "
            "t.get_target('coreml'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name,spec,message", [
    ("torch", CompileSpec(precision="int8"), "does not compile precision 'int8'; it compiles: fp32, fp16"),
    ("torch", CompileSpec(precision="fp16", device="cpu"), "fp16 for device 'cuda' only"),
    ("onnx", CompileSpec(precision="fp16"), "does not compile precision 'fp16'"),
    ("torch", CompileSpec(device="tpu"), "does not run on device 'tpu'"),
])
def test_requests_a_target_cannot_honour_are_refused(name: str, spec: CompileSpec, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        get_target(name).check(spec)


def test_compile_spec_checks_the_batch_range() -> None:
    with pytest.raises(TargetError, match="min <= opt <= max"):
        CompileSpec(min_batch=8, opt_batch=4, max_batch=16)
    with pytest.raises(TargetError, match="max_batch must be a positive integer"):
        CompileSpec(max_batch=0)


def test_pick_target_prefers_what_runs_here() -> None:
    assert pick_target(["onnx"]) == "onnx"
    assert pick_target(["onnx", "torch"]) == "torch"
    assert pick_target(["onnx", "coreml"]) == ("coreml" if sys.platform == "darwin" else "onnx")
    if not get_target("tensorrt").can_run():
        with pytest.raises(TargetError, match=r"none of the bundle's targets \(tensorrt\) can run here.*kdedge\[tensorrt\]"):
            pick_target(["tensorrt"])


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fake") / "toy.kdedge"
    shutil.copytree(toy_bundle("fp32", False), out)
    report = build_bundle(out, "fake", CompileSpec(max_batch=16))
    assert report["verified"] == "static"
    return out


def test_build_adds_a_target_and_keeps_the_bundle_valid(fake_bundle: Path) -> None:
    b = open_bundle(fake_bundle)  # every checksum, old and new
    assert b.targets == ("onnx", "fake")
    f = b.stages[1].files["fake"]
    assert f.path == "fake/stage1.json" and f.extra["verified"] == "static" and f.extra["batch_range"] == [1, 16]
    with pytest.raises(TargetError, match="already holds 'fake' files"):
        build_bundle(fake_bundle, "fake")
    with pytest.raises(TargetError, match="compiles from the stage modules.*kdedge export RUN_DIR --target torch"):
        build_bundle(fake_bundle, "torch")


def test_runner_runs_the_fake_target(fake_bundle: Path) -> None:
    _, _, xv, _, _ = digits()
    with Runner(fake_bundle, target="fake") as r:
        res = r.run(xv[:5])
        assert res.graphs == ("stage0", "stage1", "stage2") and res.probs.shape == (5, 10)
        assert np.allclose(res.probs.sum(1), 1)


def test_fake_abort_cuts_a_slow_stage_short(fake_bundle: Path) -> None:
    b = open_bundle(fake_bundle, targets=["fake"])
    s = get_target("fake").open_entry(b, b.stages[0], {"delay_s": 5.0})
    h = s.abort_handle()
    threading.Timer(0.05, h.abort).start()
    _, _, xv, _, _ = digits()
    with pytest.raises(StageAborted):
        s.run({"input": xv[:2]}, h)


def test_export_pipeline_adds_a_target(tmp_path: Path) -> None:
    from helpers_anytime import trained_toy

    from kdedge.export import ExportError, export

    _, _, xv, yv, info = digits()
    with pytest.raises(ExportError, match="does not compile precision 'int8'"):
        export(trained_toy(False), tmp_path / "bad", info=info, val_data=(xv[:16], yv[:16]), target="torch",
               precision="int8")
    assert not (tmp_path / "bad").exists()
    out = export(trained_toy(False), tmp_path / "t.kdedge", info=info, val_data=(xv[:16], yv[:16]), target="fake")
    b = open_bundle(out)
    assert b.targets == ("onnx", "fake")
    assert b.manifest["provenance"]["targets"]["fake"]["verified"] == "static"
