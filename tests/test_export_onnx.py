"""ONNX stage graphs: bundle layout, tensor names, dynamic batch, what each stage file carries,
exporter fallback, opset and simplification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers_anytime import ToyAnytime, ToyOnline, digits, toy_bundle, trained_toy
from onnx import numpy_helper

from kdedge.export import export
from kdedge.models.stages import run_stages
from kdedge.targets import open_bundle


def _initializer_elements(path: Path) -> tuple[int, list[tuple[int, ...]]]:
    model = onnx.load(str(path))
    shapes = [tuple(numpy_helper.to_array(t).shape) for t in model.graph.initializer]
    return sum(int(np.prod(s)) for s in shapes), shapes


def _own_elements(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def test_bundle_layout_and_manifest() -> None:
    path = toy_bundle()
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))
    assert names == ["manifest.json", "onnx", "onnx/prefix0.onnx", "onnx/prefix1.onnx", "onnx/prefix2.onnx",
                     "onnx/stage0.onnx", "onnx/stage1.onnx", "onnx/stage2.onnx", "profiles", "reports",
                     "reports/verify.json"]
    b = open_bundle(path)
    m = b.manifest
    assert m["family"] == "toy" and m["model"] == {"class": "ToyAnytime", "meta": {"family": "toy", "width": 8}}
    assert m["combine"] == {"default": "mean_logits", "supported": ["mean_logits", "mean_probs", "last"]}
    assert m["input"] == {"name": "input", "shape": [None, 1, 8, 8], "dtype": "float32", "layout": "NCHW"}
    assert m["preprocessing"]["scale"] == pytest.approx(1 / 16) and m["preprocessing"]["channel_order"] == "L"
    assert [s.members for s in b.stages] == [1, 2, 1] and [s.members_total for s in b.stages] == [1, 3, 4]
    assert [p.members for p in b.prefixes] == [1, 3, 4]
    assert [i.binding for i in b.stages[2].inputs] == ["stage0:f0", "stage1:f1"]
    assert [o.shape for o in b.stages[0].outputs] == [(None, 10), (None, 8, 8, 8)]
    prov = m["provenance"]
    assert prov["exporter"] == "dynamo" and prov["opset"] == 18 and prov["torch"] == torch.__version__
    assert prov["onnxruntime"] == ort.__version__ and prov["kdedge"] == m["kdedge_version"]
    assert m["verification"]["passed"] is True and m["evaluation"]["n"] == len(digits()[3])
    # MACs and parameters come from kdedge.models.flops (stage k's own parameters, shared counted once)
    from kdedge.models.flops import stage_costs

    costs = stage_costs(trained_toy().stages(), (1, 8, 8))
    assert [(s.macs, s.params) for s in b.stages] == [(c.macs, c.params) for c in costs]
    for s in [*b.stages, *b.prefixes]:
        assert set(s.accuracy) == {"mean_logits", "mean_probs", "last"}
        assert s.files["onnx"].precision == "fp32" and s.files["onnx"].extra["exporter"] == "dynamo"


def test_stage_files_use_the_bundle_tensor_names_and_a_dynamic_batch() -> None:
    b = open_bundle(toy_bundle())
    for s in [*b.stages, *b.prefixes]:
        model = onnx.load(str(b.file(s, "onnx")))
        assert [i.name for i in model.graph.input] == [i.tensor for i in s.inputs]
        assert [o.name for o in model.graph.output] == [o.tensor for o in s.outputs]
        for v in [*model.graph.input, *model.graph.output]:
            assert v.type.tensor_type.shape.dim[0].dim_param, f"{s.name}:{v.name} has a fixed batch"
        assert {o.domain: o.version for o in model.opset_import}[""] == 18
    # run the stage chain by tensor names at batch 1 and batch 7 and compare with torch
    _, _, xv, _, _ = digits()
    stages = trained_toy().stages()
    for n in (1, 7):
        x = xv[:n]
        feeds = {"input": x}
        for s in b.stages:
            sess = ort.InferenceSession(str(b.file(s, "onnx")), providers=["CPUExecutionProvider"])
            outs = sess.run(None, {i.tensor: feeds[i.tensor] for i in s.inputs})
            feeds.update(zip([o.tensor for o in s.outputs], outs))
        with torch.no_grad():
            ref = run_stages(stages, torch.from_numpy(x))
        for k, s in enumerate(b.stages):
            np.testing.assert_allclose(feeds[s.logits_tensor], ref[k]["logits"].numpy(), atol=1e-4, rtol=1e-3)


def test_stage_files_carry_only_their_own_weights() -> None:
    """No stage file holds weights of another stage or of the unused aux layer."""
    b = open_bundle(toy_bundle())
    model = trained_toy()
    modules = {m.spec.name: m for m in [*model.stages(), *model.prefixes()]}
    aux_shape = tuple(model.aux.weight.shape)
    for s in [*b.stages, *b.prefixes]:
        count, shapes = _initializer_elements(b.file(s, "onnx"))
        own = _own_elements(modules[s.name])
        assert count <= own + 16, f"{s.name}: {count} initializer elements > {own} own parameters and buffers"
        assert aux_shape not in shapes
    # stage1 must not hold stage0's stem (1->8 3x3 conv) nor stage2's block
    _, shapes1 = _initializer_elements(b.file(b.stages[1], "onnx"))
    assert (8, 1, 3, 3) not in shapes1
    assert sum(int(np.prod(s)) for s in shapes1 if len(s) == 4) == 8 * 8 * 9  # its own conv only


def test_deploy_exports_the_student_only(tmp_path: Path) -> None:
    """An AHBF-like model: the bundle holds the target branch, not the auxiliary branch or fusion."""
    _, _, xv, yv, info = digits()
    torch.manual_seed(0)
    net = ToyOnline().eval()
    path = export(net, tmp_path / "student.kdedge", info=info, val_data=(xv[:64], yv[:64]))
    b = open_bundle(path)
    assert b.family == "toy-online" and len(b.stages) == 1 and not b.prefixes
    assert b.combine_supported == ("last",)
    count, shapes = _initializer_elements(b.file(b.stages[0], "onnx"))
    student = net.deploy()
    assert count <= _own_elements(student) + 16
    total = _own_elements(net)
    assert count < total - _own_elements(net.branch1) - _own_elements(net.fusion) + 16
    assert tuple(net.fusion.weight.shape) not in shapes and (16, 8, 3, 3) not in shapes


def test_legacy_fallback_is_used_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdedge.export.onnx as konnx

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(konnx, "_export_dynamo", broken)
    _, _, xv, yv, info = digits()
    path = export(trained_toy(False), tmp_path / "legacy.kdedge", info=info, val_data=(xv[:64], yv[:64]))
    m = json.loads((path / "manifest.json").read_text())
    assert m["provenance"]["exporter"] == "legacy"
    assert all(s["files"]["onnx"]["exporter"] == "legacy" for s in m["stages"])
    assert "dynamo cannot trace this" in m["provenance"]["fallbacks"]["stage0"]
    assert m["verification"]["passed"]


def test_opset_choice_and_simplify(tmp_path: Path) -> None:
    _, _, xv, yv, info = digits()
    torch.manual_seed(0)
    net = ToyOnline().eval()
    path = export(net, tmp_path / "s.kdedge", info=info, val_data=(xv[:32], yv[:32]), opset=20, simplify=True)
    b = open_bundle(path)
    f = b.stages[0].files["onnx"]
    assert f.extra["opset"] == 20 and f.extra["simplified"] is True
    model = onnx.load(str(b.file(b.stages[0], "onnx")))
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    assert b.manifest["provenance"]["onnxsim"]


def test_toy_contract_is_what_the_helpers_claim() -> None:
    model = ToyAnytime()
    from kdedge.models.stages import check_stage_list

    check_stage_list(model.stages())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        outs = run_stages(model.stages(), x)
        fused = [p(x)[0] for p in model.prefixes()]
    total = torch.zeros(3, 10)
    for k, o in enumerate(outs):
        total = total + o["logits"]
        torch.testing.assert_close(fused[k], total, atol=1e-5, rtol=1e-5)
