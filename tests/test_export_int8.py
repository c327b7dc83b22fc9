"""INT8: QDQ stage files calibrated on real stage inputs, and the accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers_anytime import TOY_INT8_MAX_DROP, digits, toy_bundle, trained_toy
from kdedge.export import ExportError, export
from kdedge.export.ortrun import OrtChain, RunGraph
from kdedge.export.quantize import stage_feeds
from kdedge.runtime.bundle import open_bundle


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_bundle_is_quantized_and_gated() -> None:
    b = open_bundle(toy_bundle("int8"))
    m = b.manifest
    q = m["quantization"]
    assert q["precision"] == "int8" and q["format"] == "QDQ" and q["n_calibration"] == 128
    assert q["scheme"] == "u8s8" and "activations uint8 asymmetric" in q["calibration"]
    assert q["max_drop"] == TOY_INT8_MAX_DROP and q["keep_fp32"] is False and q["fp32_graphs"] == []
    fp32 = open_bundle(toy_bundle("fp32"))
    for s, f in zip([*b.stages, *b.prefixes], [*fp32.stages, *fp32.prefixes]):
        assert s.files["onnx"].precision == "int8"
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(b.file(s, "onnx"))
        # the gate held: no stage lost more than the allowed points under any rule
        for rule in b.combine_supported:
            assert 100 * (f.accuracy[rule] - s.accuracy[rule]) <= TOY_INT8_MAX_DROP
    report = json.loads((b.path / "reports" / "verify.json").read_text())
    assert report["int8"]["passed"] and len(report["int8"]["rows"]) == 3 * 3 + 3
    # graph names and wiring are unchanged by quantization
    for s in b.stages:
        model = onnx.load(str(b.file(s, "onnx")))
        assert [i.name for i in model.graph.input] == [i.tensor for i in s.inputs]
        assert [o.name for o in model.graph.output] == [o.tensor for o in s.outputs]


def test_calibration_feeds_each_stage_its_real_inputs() -> None:
    b = open_bundle(toy_bundle("fp32"))
    chain = OrtChain([RunGraph.from_entry(b, s) for s in b.stages])
    _, _, xv, yv, _ = digits()
    feeds = list(stage_feeds(chain, 2, [(xv[:5], yv[:5]), (xv[5:9], yv[5:9])]))
    assert [sorted(f) for f in feeds] == [["stage0__f0", "stage1__f1"]] * 2
    assert feeds[1]["stage1__f1"].shape == (4, 8, 8, 8)
    ref = chain.run(xv[5:9])
    np.testing.assert_array_equal(feeds[1]["stage1__f1"], ref[1]["stage1__f1"])


@pytest.mark.slow
def test_collapsing_int8_fails_or_keeps_fp32(tmp_path: Path) -> None:
    """Calibrating on images scaled by 1000 makes every activation range useless: accuracy
    collapses, and the gate must catch it (no silent INT8 collapse)."""
    xtr, ytr, xv, yv, info = digits()
    bad_calib = (xtr[:64] * 1000.0, ytr[:64])
    model = trained_toy(False)
    with pytest.raises(ExportError) as err:
        export(model, tmp_path / "bad.kdedge", info=info, val_data=(xv, yv), calib_data=bad_calib, precision="int8")
    assert "INT8 stage0 loses" in err.value.summary and "--int8-keep-fp32" in err.value.summary
    assert "INT8 gate" in str(err.value) and not (tmp_path / "bad.kdedge").exists()
    assert list(tmp_path.iterdir()) == []

    path = export(model, tmp_path / "kept.kdedge", info=info, val_data=(xv, yv), calib_data=bad_calib,
                  precision="int8", int8_keep_fp32=True)
    b = open_bundle(path)
    kept = b.manifest["quantization"]["fp32_graphs"]
    assert "stage0" in kept
    assert [s.files["onnx"].precision for s in b.stages] == ["fp32" if s.name in kept else "int8" for s in b.stages]
    fp32 = open_bundle(toy_bundle("fp32", False))
    for s, f in zip(b.stages, fp32.stages):
        for rule in b.combine_supported:
            assert 100 * (f.accuracy[rule] - s.accuracy[rule]) <= 1.0


def test_symmetric_scheme_has_zero_activation_zero_points(tmp_path: Path) -> None:
    """s8s8: int8 activations with zero point 0 (what TensorRT's explicit quantization reads)."""
    xtr, ytr, xv, yv, info = digits()
    from helpers_anytime import ToyOnline
    import torch

    torch.manual_seed(0)
    path = export(ToyOnline().eval(), tmp_path / "s8.kdedge", info=info, val_data=(xv[:64], yv[:64]),
                  calib_data=(xtr[:64], ytr[:64]), precision="int8", int8_scheme="s8s8", int8_max_drop=100)
    b = open_bundle(path)
    assert b.manifest["quantization"]["scheme"] == "s8s8"
    model = onnx.load(str(b.file(b.stages[0], "onnx")))
    init = {t.name: t for t in model.graph.initializer}
    zero_points = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points
    for z in zero_points:
        arr = onnx.numpy_helper.to_array(init[z])
        assert arr.dtype == np.int8 and not arr.any()


def test_int8_requests_are_checked(tmp_path: Path) -> None:
    _, _, xv, yv, info = digits()
    with pytest.raises(ExportError, match="precision int8 needs calibration images"):
        export(trained_toy(False), tmp_path / "b", info=info, val_data=(xv, yv), precision="int8")
    with pytest.raises(ExportError, match="int8_max_drop must be a number of points >= 0"):
        export(trained_toy(False), tmp_path / "b", info=info, val_data=(xv, yv), calib_data=(xv, yv),
               precision="int8", int8_max_drop=-1)
    with pytest.raises(ExportError, match="unknown INT8 scheme 'u4'"):
        export(trained_toy(False), tmp_path / "b", info=info, val_data=(xv, yv), calib_data=(xv, yv),
               precision="int8", int8_scheme="u4")
    assert not (tmp_path / "b").exists()
