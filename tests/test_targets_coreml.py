"""CoreML on Linux: conversion of every stage and prefix into one multifunction package, and the
checks of its functions, inputs, outputs and ops against the manifest. Prediction needs macOS
(the contract suite runs it there)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from kdedge.targets import get_target
from kdedge.targets.base import CompileSpec, TargetError

pytestmark = pytest.mark.slow  # two coremltools conversions of tiny stages, a few seconds each

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'kdedge[coreml]')")


@pytest.fixture(scope="module")
def student_coreml(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A two-stage toy model (no prefixes) converted to one package; the manifest part it needs."""
    import torch

    from helpers_anytime import ToyAnytime
    from kdedge.export.graphs import graph_example_inputs, plan_model
    from kdedge.targets.build import graph_sources

    torch.manual_seed(0)
    model = ToyAnytime(with_prefixes=False).eval()
    plan = plan_model(model)
    plan.stages = plan.stages[:2]  # two conversions keep the test short
    root = tmp_path_factory.mktemp("coreml")
    sources = graph_sources(plan, graph_example_inputs(plan, torch.zeros(2, 1, 8, 8)), root)
    target = get_target("coreml")
    files = target.compile(sources, CompileSpec(precision="fp16", device="cpu_ne", max_batch=32), root / "coreml")
    manifest = {"stages": [], "prefixes": []}
    for g, s in zip(plan.stages, sources):
        manifest["stages"].append({
            "name": g.name, "files": {"coreml": {"path": files[g.name].path.relative_to(root).as_posix()}},
            "inputs": [{"tensor": t, "shape": [None, *shp]} for t, shp in zip(s.inputs, s.input_shapes)],
            "outputs": [{"tensor": t} for t in s.outputs]})
    return root, manifest, {k: v.extra for k, v in files.items()}


def test_one_package_with_a_function_per_stage(student_coreml: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    root, manifest, extra = student_coreml
    assert [p.name for p in (root / "coreml").glob("*.mlpackage")] == ["model.mlpackage"]
    assert extra["stage0"]["package"] == extra["stage1"]["package"] == "coreml/model.mlpackage"
    assert extra["stage0"]["package_sha256"] == extra["stage1"]["package_sha256"]
    report = get_target("coreml").check_compiled(root, manifest)
    funcs = report["functions"]
    assert sorted(funcs) == ["stage0", "stage1"]
    assert [i["name"] for i in funcs["stage1"]["inputs"]] == ["stage0__f0"]
    assert funcs["stage1"]["inputs"][0]["ranges"][0] == (1, 32)  # the dynamic batch range
    assert funcs["stage0"]["outputs"] == ["stage0__logits", "stage0__f0"]
    assert "conv" in funcs["stage0"]["ops"] and "linear" in funcs["stage0"]["ops"]
    assert any("cast" in o for o in funcs["stage0"]["ops"])  # fp16 compute: casts around the fp32 inputs


def test_checks_refuse_a_package_that_differs_from_the_manifest(
        student_coreml: tuple[Path, dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    root, manifest, _ = student_coreml
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    target = get_target("coreml")
    bad = json.loads(json.dumps(manifest))
    bad["stages"][1]["outputs"][0]["tensor"] = "stage1__other"
    with pytest.raises(TargetError, match="outputs"):
        target.check_compiled(copy, bad)
    bad = json.loads(json.dumps(manifest))
    bad["stages"][0]["inputs"][0]["shape"] = [None, 1, 9, 9]
    with pytest.raises(TargetError, match="inputs"):
        target.check_compiled(copy, bad)
    (copy / "coreml" / "model.mlpackage" / "Manifest.json").write_text("{}")
    with pytest.raises(TargetError, match="sha256"):
        target.check_compiled(copy, manifest)


def test_prediction_is_refused_off_macos(student_coreml: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    if sys.platform == "darwin":
        pytest.skip("this machine is a Mac: the contract suite predicts")
    root, _, _ = student_coreml
    with pytest.raises(TargetError, match="only on macOS"):
        get_target("coreml").open(root / "coreml" / "stage0.json", name="stage0", inputs=("input",),
                                  outputs=("stage0__logits", "stage0__f0"))
    assert get_target("coreml").can_run() is False


def test_requests_coreml_cannot_honour() -> None:
    t = get_target("coreml")
    with pytest.raises(TargetError, match="does not compile precision 'int8'"):
        t.check(CompileSpec(precision="int8"))
    with pytest.raises(TargetError, match="does not run on device 'cuda'"):
        t.check(CompileSpec(precision="fp16", device="cuda"))
