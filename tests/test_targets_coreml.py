"""CoreML on Linux: conversion of every stage and prefix into one multifunction package whose
functions the manifest entries name (one shared path, a ``function`` per entry), and the checks
of its functions, inputs, outputs and ops against the manifest. Prediction needs macOS (the
contract suite runs it there)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from kdedge.targets import get_target
from kdedge.targets.base import CompileSpec, TargetError

pytestmark = pytest.mark.slow  # coremltools conversions of tiny stages, a few seconds each

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'kdedge[coreml]')")

PACKAGE = "coreml/model.mlpackage"

FAMILIES: dict[str, dict[str, Any]] = {  # the tiny configurations of tests/test_export_families.py
    "hne": dict(config="tiny", B=2),
    "ahbf": dict(backbone="resnet8", width=4, branches=3, aux=1),
    "multiexit": dict(backbone="resnet20", backbone_args={"width": 4}),
}


@pytest.fixture(scope="module")
def student_coreml(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A two-stage toy model (no prefixes) converted to one package; the manifest part it needs
    (file entries written as the export writes them)."""
    import torch
    from helpers_anytime import ToyAnytime

    from kdedge.bundle.writer import file_entry
    from kdedge.export.graphs import graph_example_inputs, plan_model
    from kdedge.export.graphs import graph_sources

    torch.manual_seed(0)
    model = ToyAnytime(with_prefixes=False).eval()
    plan = plan_model(model)
    plan.stages = plan.stages[:2]  # two conversions keep the test short
    root = tmp_path_factory.mktemp("coreml")
    sources = graph_sources(plan, graph_example_inputs(plan, torch.zeros(2, 1, 8, 8)), root)
    target = get_target("coreml")
    files = target.compile(sources, CompileSpec(precision="fp16", device="cpu_ne", max_batch=32), root / "coreml")
    manifest: dict[str, Any] = {"stages": [], "prefixes": []}
    for g, s in zip(plan.stages, sources):
        cf = files[g.name]
        manifest["stages"].append({
            "name": g.name,
            "files": {"coreml": file_entry(root, cf.path.relative_to(root).as_posix(), precision=cf.precision,
                                           **cf.extra)},
            "inputs": [{"tensor": t, "shape": [None, *shp]} for t, shp in zip(s.inputs, s.input_shapes)],
            "outputs": [{"tensor": t} for t in s.outputs]})
    return root, manifest, {k: v.extra for k, v in files.items()}


def test_one_package_with_a_function_per_stage(student_coreml: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    root, manifest, extra = student_coreml
    assert sorted(p.name for p in (root / "coreml").iterdir()) == ["model.mlpackage"]  # no descriptors
    assert [s["files"]["coreml"]["path"] for s in manifest["stages"]] == [PACKAGE, PACKAGE]
    assert [extra["stage0"]["function"], extra["stage1"]["function"]] == ["stage0", "stage1"]
    assert extra["stage0"]["compute_units"] == extra["stage0"]["device"] == "cpu_ne"
    assert "package_sha256" not in extra["stage0"]  # the entry's own sha256 is the package's
    report = get_target("coreml").check_compiled(root, manifest)
    assert report["package"] == PACKAGE
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

    def changed(edit: Any) -> dict[str, Any]:
        bad = json.loads(json.dumps(manifest))
        edit(bad)
        return bad

    with pytest.raises(TargetError, match="outputs"):
        target.check_compiled(copy, changed(lambda m: m["stages"][1]["outputs"][0].update(tensor="stage1__other")))
    with pytest.raises(TargetError, match="inputs"):
        target.check_compiled(copy, changed(lambda m: m["stages"][0]["inputs"][0].update(shape=[None, 1, 9, 9])))
    with pytest.raises(TargetError, match="has no function 'stage7' for stage1"):
        target.check_compiled(copy, changed(lambda m: m["stages"][1]["files"]["coreml"].update(function="stage7")))
    with pytest.raises(TargetError, match="stage1 name no function"):
        target.check_compiled(copy, changed(lambda m: m["stages"][1]["files"]["coreml"].pop("function")))
    with pytest.raises(TargetError, match="name 2 files"):
        target.check_compiled(copy, changed(lambda m: m["stages"][1]["files"]["coreml"].update(path="coreml/x")))
    (copy / "coreml" / "model.mlpackage" / "Manifest.json").write_text("{}")
    with pytest.raises(TargetError, match="sha256"):
        target.check_compiled(copy, manifest)


def test_sessions_take_the_function_the_manifest_names(
        student_coreml: tuple[Path, dict[str, Any], dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a session checks before coremltools loads the model (that part runs on Linux too), and
    ``open_entry`` passing the entry's ``function``."""
    from kdedge.bundle.manifest import StageEntry
    from kdedge.targets import coreml

    root, manifest, _ = student_coreml
    pkg = root / PACKAGE
    with pytest.raises(TargetError, match=r"not a CoreML \.mlpackage directory .*re-export the bundle"):
        coreml.CoreMLSession(root / "coreml" / "stage0.json", name="stage0", inputs=("input",), outputs=())
    with pytest.raises(TargetError, match="has no function 'stage9'"):
        coreml.CoreMLSession(pkg, name="stage0", function="stage9", inputs=("input",), outputs=())
    with pytest.raises(TargetError, match="function stage1 has inputs"):
        coreml.CoreMLSession(pkg, name="stage0", function="stage1", inputs=("input",),
                             outputs=("stage0__logits", "stage0__f0"))

    opened: list[dict[str, Any]] = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(coreml, "CoreMLSession", lambda path, **kw: opened.append({"path": path, **kw}))
    m = json.loads(json.dumps(manifest))
    m["stages"][1]["files"]["coreml"]["function"] = "renamed"  # the manifest, not the graph name, decides
    entries = [StageEntry.from_dict({
        **s, "inputs": [{"binding": "input", "dtype": "float32", **i} for i in s["inputs"]],
        "outputs": [{"name": o["tensor"], "shape": [None], "dtype": "float32", **o} for o in s["outputs"]],
        "logits": s["outputs"][0]["tensor"], "members": 1, "members_total": k + 1, "macs": 1, "params": 1}, k)
        for k, s in enumerate(m["stages"])]

    class FakeBundle:
        def file(self, entry: StageEntry, target: str) -> Path:
            return root / entry.files[target].path

    for e in entries:
        get_target("coreml").open_entry(FakeBundle(), e, {"compute_units": "cpu"})
    assert [(o["path"], o["name"], o["function"], o["compute_units"]) for o in opened] == [
        (pkg, "stage0", "stage0", "cpu"), (pkg, "stage1", "renamed", "cpu")]


def test_prediction_is_refused_off_macos(student_coreml: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    if sys.platform == "darwin":
        pytest.skip("this machine is a Mac: the contract suite predicts")
    root, _, _ = student_coreml
    with pytest.raises(TargetError, match="only on macOS"):
        get_target("coreml").open(root / PACKAGE, name="stage0", function="stage0", inputs=("input",),
                                  outputs=("stage0__logits", "stage0__f0"))
    assert get_target("coreml").can_run() is False


def test_requests_coreml_cannot_honour() -> None:
    t = get_target("coreml")
    with pytest.raises(TargetError, match="does not compile precision 'int8'"):
        t.check(CompileSpec(precision="int8"))
    with pytest.raises(TargetError, match="does not run on device 'cuda'"):
        t.check(CompileSpec(precision="fp16", device="cuda"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_one_package_that_passes_the_linux_checks(family: str, tmp_path: Path) -> None:
    """``kdedge export --target coreml``: every graph's entry names the package and its own
    function, the bundle reader checks the package once, and there are no descriptor files."""
    import torch
    from helpers_anytime import digits

    from kdedge.export import export
    from kdedge.models import create_model
    from kdedge.targets import open_bundle

    _, _, xv, yv, info = digits()
    torch.manual_seed(0)
    model = create_model(family, num_classes=10, in_channels=1, input_size=(8, 8), **FAMILIES[family]).eval()
    path = export(model, tmp_path / f"{family}.kdedge", info=info, val_data=(xv[:16], yv[:16]), target="coreml",
                  precision="fp16", max_batch=8)
    b = open_bundle(path, targets=["coreml"])
    assert b.schema_version == 2 and b.targets == ("onnx", "coreml")
    graphs = [*b.stages, *b.prefixes]
    entries = [g.files["coreml"] for g in graphs]
    assert {e.path for e in entries} == {PACKAGE} and len({e.sha256 for e in entries}) == 1
    assert [e.function for e in entries] == [g.name for g in graphs]  # distinct, one per graph
    assert all(e.extra["verified"] == "static" and e.precision == "fp16" for e in entries)
    assert sorted(p.name for p in (path / "coreml").iterdir()) == ["model.mlpackage"]
    report = b.manifest["provenance"]["targets"]["coreml"]
    assert report["verified"] == "static" and sorted(report["functions"]) == sorted(g.name for g in graphs)
    # the same checks, run again on the committed bundle
    assert sorted(get_target("coreml").check_compiled(path, b.manifest)["functions"]) == sorted(g.name for g in graphs)
