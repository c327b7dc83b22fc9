"""Zero-padding of grouped channels at export (kdedge/export/pad.py): the padded graph computes
what the exported one did, every group of a padded layer has a multiple of the block, and
anything the pass does not understand is left as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from kdedge.export.pad import pad_file, pad_grouped_channels  # noqa: E402

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.3, name)


def _const(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _conv(x: str, w: str, b: str | None, y: str, group: int = 1, k: int = 1) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], group=group, kernel_shape=[k, k],
                            pads=[k // 2] * 4)


def _model(nodes: list, inits: list, out: str = "logits", out_shape: tuple = ("N", 10)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _members(tail_min: float = 0.0, add_const: bool = False) -> tuple[list, list]:
    """Two members side by side, 28 channels each in their bottleneck (``s``): a split
    convolution, a residual block of grouped convolutions, a depth-wise convolution, a spatial
    mean and a grouped classifier, as an HNE's fused prefix has them."""
    inits = [_w("w0", 56, 4, 3, 3), _w("b0", 56), _w("w1", 56, 28, 1, 1), _w("b1", 56),
             _w("w2", 64, 28, 1, 1), _w("b2", 64), _w("wd", 64, 1, 3, 3), _w("bd", 64),
             _w("w3", 56, 32, 1, 1), _w("b3", 56), _w("wc", 20, 28, 1, 1), _w("bc", 20),
             _const("lo", tail_min), _const("hi", 6.0), _const("one", 1.0),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, 2, 10], np.int64), "shape3"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        _conv("input", "w0", "b0", "s0", group=1, k=3),            # one conv writes both members (group 1)
        helper.make_node("Clip", ["s0", "lo", "hi"], ["s1"]),
        _conv("s1", "w1", "b1", "r", group=2),                     # grouped, 28 -> 28 per member
        helper.make_node("Add", ["s1", "r"], ["s2x"]),
        helper.make_node("Add", ["s2x", "one"], ["s2"]) if add_const else helper.make_node("Relu", ["s2x"], ["s2"]),
        _conv("s2", "w2", "b2", "h0", group=2),                    # expand 28 -> 32 per member
        helper.make_node("Relu", ["h0"], ["h1"]),
        _conv("h1", "wd", "bd", "h2", group=64, k=3),              # depth-wise
        _conv("h2", "w3", "b3", "p", group=2),                     # project 32 -> 28 per member
        helper.make_node("Add", ["p", "s2"], ["s3"]),
        helper.make_node("ReduceMean", ["s3", "axes"], ["m"], keepdims=1),
        _conv("m", "wc", "bc", "c", group=2),                      # classifier, 10 classes per member
        helper.make_node("Reshape", ["c", "shape3"], ["c3"]),
        helper.make_node("ReduceSum", ["c3", "axis1"], ["logits"], keepdims=0),
    ]
    return nodes, inits


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            out[n.output[0]] = (inits[n.input[1]], group)
    return out


@pytest.mark.parametrize("block", [8, 16])
def test_padding_keeps_outputs_and_fills_blocks(block: int) -> None:
    model = _model(*_members())
    x = RNG.standard_normal((3, 4, 6, 6)).astype(np.float32)
    before = _run(model, x)
    n = pad_grouped_channels(model, block)
    assert n == 5  # every convolution but the depth-wise one reads or writes the 28-channel members
    onnx.checker.check_model(model)
    after = _run(model, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    w = _weights(model)
    c = 32
    assert w["r"][0].shape[:2] == (2 * c, c) and w["r"][1] == 2        # grouped: padded rows and columns
    assert w["s0"][0].shape[:2] == (2 * c, 4)                           # writes the padded layout
    assert w["h0"][0].shape[:2] == (64, c)                              # reads it (32 per member: unchanged)
    assert w["p"][0].shape[:2] == (2 * c, 32)
    assert w["c"][0].shape[:2] == (20, c)                               # the classifier reads the padded mean
    assert w["h2"][0].shape[0] == 64 and w["h2"][1] == 64               # depth-wise on 32 per member: as it was
    # the extra channels are zero: the rows a padded producer adds, the columns a consumer adds
    r = w["r"][0][:, :, 0, 0]
    assert not r[28:32].any() and not r[60:64].any() and not r[:, 28:32].any()
    assert r[:28, :28].all() and r[32:60, :28].all()


def _depthwise_model(per_member: int) -> onnx.ModelProto:
    C = 2 * per_member
    inits = [_w("w1", C, 4, 1, 1), _w("b1", C), _w("wd", C, 1, 3, 3), _w("bd", C),
             _w("wc", 20, per_member, 1, 1), _w("bc", 20),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, 20], np.int64), "shape2")]
    nodes = [_conv("input", "w1", "b1", "a", group=1), helper.make_node("Relu", ["a"], ["a1"]),
             _conv("a1", "wd", "bd", "d", group=C, k=3),
             helper.make_node("ReduceMean", ["d", "axes"], ["m"], keepdims=1),
             _conv("m", "wc", "bc", "c", group=2), helper.make_node("Reshape", ["c", "shape2"], ["logits"])]
    return _model(nodes, inits, out_shape=("N", 20))


def test_a_depthwise_layer_on_the_padded_tensor_is_widened() -> None:
    model = _depthwise_model(28)
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    before = _run(model, x)
    assert pad_grouped_channels(model, 16) == 3
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-5)
    w = _weights(model)
    assert w["d"][0].shape[0] == 64 and w["d"][1] == 64


@pytest.mark.parametrize("per_member", [4, 8])
def test_small_groups_are_not_padded(per_member: int) -> None:
    """4 -> 16 or 8 -> 16 channels would more than double the layers' work."""
    model = _depthwise_model(per_member)
    assert pad_grouped_channels(model, 16) == 0


@pytest.mark.parametrize("case", ["clip-min-above-zero", "add-constant", "graph-output", "one-group", "aligned"])
def test_what_the_pass_does_not_understand_is_left_alone(case: str) -> None:
    if case == "graph-output":  # a carried tensor of the stage contract keeps its shape
        nodes, inits = _members()
        model = _model(nodes, inits)
        model.graph.output.append(helper.make_tensor_value_info("s2", TensorProto.FLOAT, ["N", 24, 6, 6]))
    elif case == "one-group":  # onnxruntime pads convolutions of one group itself
        inits = [_w("w1", 24, 4, 1, 1), _w("b1", 24), _w("w2", 10, 24, 1, 1),
                 numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                 numpy_helper.from_array(np.array([0, 10], np.int64), "shape2")]
        nodes = [_conv("input", "w1", "b1", "a"), _conv("a", "w2", None, "b"),
                 helper.make_node("ReduceMean", ["b", "axes"], ["m"], keepdims=1),
                 helper.make_node("Reshape", ["m", "shape2"], ["logits"])]
        model = _model(nodes, inits)
    elif case == "aligned":  # 16 channels per group already
        inits = [_w("w1", 32, 4, 1, 1), _w("w2", 20, 16, 1, 1),
                 numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                 numpy_helper.from_array(np.array([0, 20], np.int64), "shape2")]
        nodes = [_conv("input", "w1", None, "a"), helper.make_node("ReduceMean", ["a", "axes"], ["m"], keepdims=1),
                 _conv("m", "w2", None, "c", group=2), helper.make_node("Reshape", ["c", "shape2"], ["logits"])]
        model = _model(nodes, inits, out_shape=("N", 20))
    else:
        model = _model(*_members(tail_min=0.5 if case == "clip-min-above-zero" else 0.0,
                                 add_const=case == "add-constant"))
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    before = _run(model, x)
    shapes = {k: v[0].shape for k, v in _weights(model).items()}
    assert pad_grouped_channels(model, 16) == 0
    assert {k: v[0].shape for k, v in _weights(model).items()} == shapes
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


def test_pad_file_rewrites_only_when_something_changed(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    inits = [_w("w1", 32, 4, 1, 1), _w("w2", 20, 16, 1, 1),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, 20], np.int64), "shape2")]
    nodes = [_conv("input", "w1", None, "a"), helper.make_node("ReduceMean", ["a", "axes"], ["m"], keepdims=1),
             _conv("m", "w2", None, "c", group=2), helper.make_node("Reshape", ["c", "shape2"], ["logits"])]
    onnx.save(_model(nodes, inits, out_shape=("N", 20)), str(path))
    before = path.read_bytes()
    assert pad_file(path) == 0 and path.read_bytes() == before
    onnx.save(_model(*_members()), str(path))
    assert pad_file(path) == 5
    assert not list(tmp_path.glob("*.tmp"))
    onnx.checker.check_model(onnx.load(str(path)))


def test_export_refuses_a_bad_block(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kdedge.bundle.errors import ExportError
    from kdedge.export import export

    info = {"num_classes": 2, "in_channels": 1, "input_size": [4, 4], "mean": [0.0], "std": [1.0], "scale": 1.0,
            "channel_order": "L", "class_names": ["a", "b"]}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with pytest.raises(ExportError, match="pad_channels must be one of 0, 8, 16, 32"):
        export(model, tmp_path / "b.kdedge", info=info, val_data=(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2)),
               pad_channels=12)
    assert not (tmp_path / "b.kdedge").exists()


@pytest.mark.slow
def test_export_pads_an_hne_of_odd_widths_and_verifies_it(tmp_path: Path) -> None:
    """A MobileNetV2 HNE at width 0.25 (24 and 56 channels per member in grouped layers): its
    multi-member graphs get padded, verification against torch passes, its 24 and 56-channel
    layers have 32 and 64, and the runner's fused prefix agrees with the chain."""
    torch = pytest.importorskip("torch")
    from kdedge.export import export
    from kdedge.models import create_model
    from kdedge.runtime import Fixed, Full, Runner

    torch.manual_seed(0)
    m = create_model("hne", num_classes=10, in_channels=3, input_size=(32, 32), config="mobilenetv2", B=2, width=0.25)
    x = torch.randn(16, 3, 32, 32)
    info = {"num_classes": 10, "in_channels": 3, "input_size": [32, 32], "mean": [0.0] * 3, "std": [1.0] * 3,
            "scale": 255.0, "channel_order": "RGB", "class_names": [str(i) for i in range(10)]}
    path = export(m, tmp_path / "b.kdedge", info=info, val_data=(x, torch.randint(0, 10, (16,))))
    man = json.loads((path / "manifest.json").read_text())
    padded = {e["name"]: e["files"]["onnx"]["padded_convs"] for e in man["stages"] + man["prefixes"]}
    assert padded["stage0"] == 0 and padded["prefix2"] > 0  # one member: nothing grouped
    last = onnx.load(str(path / man["prefixes"][-1]["files"]["onnx"]["path"]))
    inits = {t.name: list(t.dims) for t in last.graph.initializer}
    widths = set()
    for n in last.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1 and inits[n.input[1]][1] > 1:  # grouped, not depth-wise
            widths |= {inits[n.input[1]][1], inits[n.input[1]][0] // group}
    assert {32, 64} <= widths and not {24, 56} & widths  # 24 -> 32 and 56 -> 64 per member
    xs = x[:4].numpy()
    with Runner(path) as r:
        chain = r.run(xs, Full())
        fused = r.run(xs, Fixed(r.num_stages, fused=True))
    np.testing.assert_allclose(fused.probs, chain.probs, rtol=1e-4, atol=1e-5)


def test_int8_quantization_of_a_padded_graph_matches_the_unpadded_one(tmp_path: Path) -> None:
    """Zero filter rows must not upset per-channel weight scales (a zero range) in static INT8."""
    import copy

    from kdedge.export.quantize import quantize_file

    plain = _model(*_members())
    padded = copy.deepcopy(plain)
    assert pad_grouped_channels(padded, 16) == 5
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    outs = []
    for name, m in (("plain", plain), ("padded", padded)):
        src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}8.onnx"
        onnx.save(m, str(src))
        quantize_file(src, dst, feeds)
        outs.append(_run(onnx.load(str(dst)), feeds[0]["input"]))
    assert np.isfinite(outs[1]).all()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_a_graph_with_control_flow_is_left_alone() -> None:
    nodes, inits = _members()
    branch = helper.make_graph([helper.make_node("Identity", ["s2"], ["y"])], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    inits.append(numpy_helper.from_array(np.array(True), "cond"))
    nodes.append(helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch))
    model = _model(nodes, inits)
    assert pad_grouped_channels(model, 16) == 0
