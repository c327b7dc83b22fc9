"""Zero-padding of grouped channels, so that onnxruntime can run grouped convolutions in its
blocked NCHWc layout.

onnxruntime's CPU provider moves a convolution to its blocked layout (channels in blocks of 16
with AVX-512, 8 with AVX2) only when, for a grouped convolution that is not depth-wise, the
channels per group are a multiple of the block; a plain convolution (one group) it pads itself.
An HNE's fused prefix runs its members side by side as one grouped convolution per layer, and
MobileNetV2 ×1.4 has 88 and 136 channels per member in its linear bottlenecks: those layers fall
back to plain NCHW convolutions with a layout conversion on either side (docs/performance.md).

This pass gives every group of such a tensor ``round_up(c, block)`` channels, the extra ones
identically zero (only where that adds at most half: 88 -> 96 or 24 -> 32 channels, not 8 -> 16,
where the zeros cost more than the blocked layout saves; ``bench/bench_pad_growth.py``): the
producing convolutions get zero filter rows and zero biases, depth-wise
convolutions and element-wise operators on the way carry the zeros through (``relu(0)``,
``clip(0)`` with ``min <= 0 <= max`` and ``0 + 0`` are 0), and the consuming convolutions get zero
filter columns, so every other tensor of the graph, and its outputs, are what they were up to
float rounding. The manifest keeps the model's own MAC counts.

A group of tensors is padded only when all of it is understood: produced by convolutions with
constant weights, read by convolutions, ``Relu``, ``Clip``, ``Add`` of two such tensors, depth-wise
convolutions and spatial means that keep their dimensions, and neither a graph input nor
output (so the carried tensors of the stage contract never change). Anything else leaves it
as exported, and so does a graph with control flow (its subgraphs may read any tensor).

Example:
    >>> n = pad_file(Path("prefix2.onnx"))     # convolutions whose filters were widened
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BLOCK", "PAD_BLOCKS", "pad_file", "pad_grouped_channels"]

BLOCK = 16  # onnxruntime's NCHWc block with AVX-512; a multiple of AVX2's 8
PAD_BLOCKS = (0, 8, 16, 32)  # what export accepts (0: no padding)
MAX_GROWTH = 0.5  # pad c channels only when round_up(c, block) <= 1.5 c: 24 -> 32 paid, 8 -> 16 did not (bench_pad_growth)

_PASS = ("Relu", "Clip", "Add")  # element-wise operators that keep a zero a zero (Clip: checked)


@dataclass
class _Group:
    """Tensors that must share one channel layout (joined through element-wise operators,
    depth-wise convolutions and spatial means)."""

    tensors: set[str] = field(default_factory=set)
    producers: list[Any] = field(default_factory=list)   # non-depth-wise Conv nodes writing one of them
    consumers: list[Any] = field(default_factory=list)   # non-depth-wise Conv nodes reading one (input 0)
    depthwise: list[Any] = field(default_factory=list)
    unsafe: bool = False
    chunks: int = 1      # groups of the layout (k)
    width: int = 0       # channels per group (c)
    padded: int = 0      # channels per group after padding (c')


class _Sets:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_int_attr(node: Any, name: str, value: int) -> None:
    import onnx

    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(onnx.helper.make_attribute(name, int(value)))
            return
    node.attribute.append(onnx.helper.make_attribute(name, int(value)))


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            value = _attr(node, "value")
            if value is not None:
                out[node.output[0]] = numpy_helper.to_array(value)
    return out


def _conv_weight(node: Any, consts: dict[str, np.ndarray]) -> np.ndarray | None:
    if len(node.input) < 2 or node.input[1] not in consts:
        return None
    w = consts[node.input[1]]
    if w.ndim != 4 or (len(node.input) > 2 and node.input[2] and node.input[2] not in consts):
        return None
    return w


def _is_depthwise(node: Any, w: np.ndarray) -> bool:
    g = int(_attr(node, "group", 1))
    return g > 1 and w.shape[1] == 1 and w.shape[0] == g


def _clip_keeps_zero(node: Any, consts: dict[str, np.ndarray]) -> bool:
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        if len(node.input) > i and node.input[i]:
            if node.input[i] not in consts or consts[node.input[i]].size != 1:
                return False
            bounds.append(float(consts[node.input[i]].reshape(())))
        else:
            attr = _attr(node, "min" if i == 1 else "max")  # opset < 11
            bounds.append(default if attr is None else float(attr))
    return bounds[0] <= 0.0 <= bounds[1]


def _spatial_mean(node: Any, consts: dict[str, np.ndarray]) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean" or int(_attr(node, "keepdims", 1)) != 1:
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in consts:
            return False
        axes = consts[node.input[1]].reshape(-1).tolist()
    return axes is not None and len(axes) > 0 and {int(a) % 4 for a in axes} <= {2, 3}


def _groups(graph: Any, consts: dict[str, np.ndarray]) -> dict[str, _Group]:
    sets = _Sets()
    unsafe: set[str] = set()
    producers: list[tuple[str, Any]] = []
    consumers: list[tuple[str, Any]] = []
    depthwise: list[tuple[str, Any]] = []
    for node in graph.node:
        data = [t for t in node.input if t and t not in consts]
        outs = [t for t in node.output if t]
        first = [node.input[0]] if node.input else []
        for t in (*data, *outs):
            sets.find(t)
        if node.op_type == "Conv":
            w = _conv_weight(node, consts)
            if w is None or len(outs) != 1 or data != first:
                unsafe.update((*data, *outs))
            elif _is_depthwise(node, w):
                sets.union(data[0], outs[0])
                depthwise.append((outs[0], node))
            else:
                consumers.append((data[0], node))
                producers.append((outs[0], node))
        elif node.op_type in _PASS and len(outs) == 1:
            ok = (node.op_type != "Clip" or _clip_keeps_zero(node, consts)) and \
                 (node.op_type != "Add" or (len(data) == 2 and len(node.input) == 2))
            if not ok or (node.op_type != "Add" and data != first):
                unsafe.update((*data, *outs))
            for t in data:
                sets.union(t, outs[0])
        elif len(outs) == 1 and data == first and len(data) == 1 and _spatial_mean(node, consts):
            sets.union(data[0], outs[0])
        else:
            unsafe.update((*data, *outs))
    unsafe.update(v.name for v in graph.input)
    unsafe.update(v.name for v in graph.output)
    groups: dict[str, _Group] = {}
    for t in list(sets.parent):
        groups.setdefault(sets.find(t), _Group()).tensors.add(t)
    for t in unsafe:
        if t in sets.parent:
            groups[sets.find(t)].unsafe = True
    for t, node in producers:
        groups[sets.find(t)].producers.append(node)
    for t, node in consumers:
        groups[sets.find(t)].consumers.append(node)
    for t, node in depthwise:
        groups[sets.find(t)].depthwise.append(node)
    return groups


def _plan(g: _Group, consts: dict[str, np.ndarray], block: int) -> bool:
    """Decide the padded layout of one group; False: leave it as it is."""
    if g.unsafe or not g.producers:
        return False
    channels = {int(consts[n.input[1]].shape[0]) for n in g.producers}
    if len(channels) != 1:
        return False
    C = channels.pop()
    grouped = [int(_attr(n, "group", 1)) for n in (*g.producers, *g.consumers)]
    k = max(grouped)
    if k <= 1 or C % k or any(k % x for x in grouped):
        return False  # one group everywhere: onnxruntime pads those itself
    for n in g.consumers:
        if int(consts[n.input[1]].shape[1]) * int(_attr(n, "group", 1)) != C:
            return False
    if any(int(consts[n.input[1]].shape[0]) != C for n in g.depthwise):
        return False
    c = C // k
    padded = -(-c // block) * block
    if c % block == 0 or padded > (1 + MAX_GROWTH) * c:
        return False  # aligned already, or padding would cost more than the blocked layout gains
    g.chunks, g.width, g.padded = k, c, padded
    return True


def _index(g: _Group, n: int) -> np.ndarray:
    """New positions of the first ``n`` channels (a multiple of the group width) of ``g``."""
    i = np.arange(n)
    return (i // g.width) * g.padded + i % g.width


def pad_grouped_channels(model: Any, block: int = BLOCK) -> int:
    """Pad, in place, the channels per group of ``model``'s grouped tensors to multiples of
    ``block`` (see the module docstring); returns how many convolutions changed."""
    import onnx
    from onnx import numpy_helper

    if block <= 1:
        return 0
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # control flow: a subgraph may read any tensor without naming it as an input
    consts = _constants(graph)
    groups = [g for g in _groups(graph, consts).values() if _plan(g, consts, block)]
    if not groups:
        return 0
    out_of: dict[int, _Group] = {}
    in_of: dict[int, _Group] = {}
    dw_of: dict[int, _Group] = {}
    nodes: dict[int, Any] = {}
    for g in groups:
        for n in g.producers:
            out_of[id(n)], nodes[id(n)] = g, n
        for n in g.consumers:
            in_of[id(n)], nodes[id(n)] = g, n
        for n in g.depthwise:
            dw_of[id(n)], nodes[id(n)] = g, n
    uses: dict[str, int] = {}
    for node in graph.node:
        for t in node.input:
            uses[t] = uses.get(t, 0) + 1
    new_inits = []
    for key, node in nodes.items():
        w = consts[node.input[1]]
        b = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        gout, gin, gdw = out_of.get(key), in_of.get(key), dw_of.get(key)
        rows = np.arange(w.shape[0])
        cols = np.arange(w.shape[1])
        n_rows, n_cols = w.shape[0], w.shape[1]
        if gdw is not None:
            rows = _index(gdw, w.shape[0])
            n_rows = gdw.chunks * gdw.padded
            _set_int_attr(node, "group", n_rows)
        if gout is not None:
            rows = _index(gout, w.shape[0])
            n_rows = gout.chunks * gout.padded
        if gin is not None:
            cols = _index(gin, w.shape[1])  # a group's columns span whole chunks of gin
            n_cols = (w.shape[1] // gin.width) * gin.padded
        w2 = np.zeros((n_rows, n_cols, *w.shape[2:]), w.dtype)
        w2[np.ix_(rows, cols)] = w
        names = [node.input[1]]
        arrays = [w2]
        if b is not None:
            b2 = np.zeros(n_rows, b.dtype)
            b2[rows] = b
            names.append(node.input[2])
            arrays.append(b2)
        for slot, (name, arr) in enumerate(zip(names, arrays), start=1):
            new = f"{name}__padded{len(new_inits)}"
            new_inits.append(numpy_helper.from_array(arr, new))
            node.input[slot] = new
            uses[name] -= 1
    keep = [t for t in graph.initializer if uses.get(t.name, 0) > 0]
    del graph.initializer[:]
    graph.initializer.extend([*keep, *new_inits])
    changed = {t for g in groups for t in g.tensors}
    kept_info = [v for v in graph.value_info if v.name not in changed]  # their shapes changed
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return len(nodes)


def pad_file(path: Path, block: int = BLOCK) -> int:
    """:func:`pad_grouped_channels` on an ONNX file, rewritten only when something changed."""
    import onnx

    model = onnx.load(str(path))
    n = pad_grouped_channels(model, block)
    if n:  # onnxruntime loads it next, in verification
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
    return n
