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
from kdedge.targets import open_bundle


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_bundle_is_quantized_and_gated() -> None:
    b = open_bundle(toy_bundle("int8"))
    m = b.manifest
    q = m["quantization"]
    assert q["precision"] == "int8" and q["format"] == "QDQ" and q["n_calibration"] == 128
    assert q["scheme"] == "u8s7" and q["weight_bits"] == 7 and "activations uint8 asymmetric" in q["calibration"]
    assert "cannot saturate" in q["why"] and q["exported_on"]["int8_dot"] in ("vnni", "pairwise-int16", "arm", "unknown")
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


def _weight_ranges(path: Path) -> list[tuple[int, int]]:
    """(min, max) of every int8 weight initializer that a DequantizeLinear reads."""
    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init:
            arr = onnx.numpy_helper.to_array(init[n.input[0]])
            if arr.dtype == np.int8 and arr.ndim == 4:  # convolution weights (per channel)
                out.append((int(arr.min()), int(arr.max())))
    return out


def test_default_scheme_keeps_weights_in_seven_bits() -> None:
    """Why the default cannot saturate on any CPU: with weights in [-64, 64] a pair of uint8 x int8
    products is at most 2 * 255 * 64 = 32640, inside VPMADDUBSW's int16 (kdedge.export.quantize)."""
    b = open_bundle(toy_bundle("int8"))
    for s in [*b.stages, *b.prefixes]:
        ranges = _weight_ranges(b.file(s, "onnx"))
        assert ranges, s.name
        for lo, hi in ranges:
            assert -64 <= lo and hi <= 64, (s.name, lo, hi)
        assert max(2 * 255 * max(-lo, hi) for lo, hi in ranges) <= 32767


@pytest.mark.parametrize("scheme, bits", [("u8s8", 8), ("s8s7", 7)])
def test_other_schemes_are_recorded_and_use_their_weight_range(tmp_path: Path, scheme: str, bits: int) -> None:
    xtr, ytr, xv, yv, info = digits()
    path = export(trained_toy(False), tmp_path / "b.kdedge", info=info, val_data=(xv[:64], yv[:64]),
                  calib_data=(xtr[:64], ytr[:64]), precision="int8", int8_scheme=scheme, int8_max_drop=100)
    b = open_bundle(path)
    q = b.manifest["quantization"]
    assert (q["scheme"], q["weight_bits"]) == (scheme, bits)
    assert ("can saturate" in q["why"]) == (bits == 8)
    widest = max(max(-lo, hi) for s in b.stages for lo, hi in _weight_ranges(b.file(s, "onnx")))
    # symmetric per-channel weights: the largest weight of a channel maps to the end of the range
    assert widest == (127 if bits == 8 else 64)


def test_gate_names_the_scheme_when_this_cpu_saturates(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdedge.export import quantize

    monkeypatch.setattr("kdedge.cpu.saturates_full_range_int8", lambda *a, **k: True)
    assert "use --int8-scheme u8s7" in quantize._remedy("u8s8")
    assert "use --int8-scheme s8s7" in quantize._remedy("s8s8")
    assert "--int8-scheme" not in quantize._remedy("u8s7")
    monkeypatch.setattr("kdedge.cpu.saturates_full_range_int8", lambda *a, **k: False)
    assert "--int8-scheme" not in quantize._remedy("u8s8")


def test_symmetric_scheme_has_zero_activation_zero_points(tmp_path: Path) -> None:
    """s8s8: int8 activations with zero point 0 (what TensorRT's explicit quantization reads)."""
    xtr, ytr, xv, yv, info = digits()
    import torch
    from helpers_anytime import ToyOnline

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
    with pytest.raises(ExportError, match="unknown INT8 scheme 'u4'; known: u8s7, s8s7, u8s8, s8s8"):
        export(trained_toy(False), tmp_path / "b", info=info, val_data=(xv, yv), calib_data=(xv, yv),
               precision="int8", int8_scheme="u4")
    assert not (tmp_path / "b").exists()
