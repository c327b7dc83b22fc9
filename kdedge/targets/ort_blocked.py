"""Carried tensors in onnxruntime's blocked layout: the stage graphs of a bundle, as onnxruntime
optimises them on this CPU, edited so that a feature map one stage hands to a later one stays in
the NCHWc layout its convolutions use, instead of being converted to NCHW at the end of the
producing stage (``ReorderOutput``) and back at the start of each consumer (``ReorderInput``).

The conversions are pure data movement, so the edited chain computes exactly what the bundle's
graphs compute; the runner checks that on a sample when it opens the sessions (identical logits)
and keeps the bundle's graphs when it is not so. At batch 1 the paper-size CIFAR HNE's chain
ran 0-2.4 % faster with it (docs/performance.md). Nothing is written into the bundle: the
blocked layout is tied to this CPU's block size and to onnxruntime's own operators, so the graphs
are made again at each open.

The graphs are edited at the protobuf wire level (only node lists change; everything else,
weights included, is copied as it is), so the device install needs no ``onnx`` package.

Example:
    >>> edited, names = block_carried(optimised_models, carried)   # {stage index: model bytes}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["CarriedTensor", "block_carried", "blocked_carry_enabled"]

NCHWC = "com.microsoft.nchwc"
_MODEL_GRAPH, _GRAPH_NODE = 7, 1
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP, _NODE_ATTR, _NODE_DOMAIN = 1, 2, 4, 5, 7
_ATTR_NAME, _ATTR_INT = 1, 3
BLOCK = 16  # the widest NCHWc block onnxruntime uses (AVX-512); 8 on AVX2 divides it


def blocked_carry_enabled() -> bool:
    """True with ``KDEDGE_ORT_BLOCKED=1``. Off by default: the gain measured on the paper-size
    CIFAR HNE at batch 1 (0-2.4 % of a request, depending on how the paths were interleaved;
    docs/performance.md) does not yet pay for opening every stage twice on the device."""
    import os

    return os.environ.get("KDEDGE_ORT_BLOCKED", "0").strip() in ("1", "true", "yes", "on")


# -- protobuf wire format (only what the edit needs) ---------------------------------------------
def _varint(b: bytes | memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(b):
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        if c < 0x80:
            return value, i
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        c = v & 0x7F
        v >>= 7
        if v:
            out.append(c | 0x80)
        else:
            out.append(c)
            return bytes(out)


@dataclass
class _Field:
    number: int
    wire: int
    start: int  # the field's first byte (its key)
    value: int  # its payload's first byte (after the length, for length-delimited fields)
    end: int


def _fields(b: memoryview) -> list[_Field]:
    out = []
    i, n = 0, len(b)
    while i < n:
        start = i
        key, i = _varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = i
            _, i = _varint(b, i)
        elif wire == 1:
            value, i = i, i + 8
        elif wire == 2:
            length, value = _varint(b, i)
            i = value + length
        elif wire == 5:
            value, i = i, i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf field")
        out.append(_Field(number, wire, start, value, i))
    return out


def _delimited(number: int, payload: bytes) -> bytes:
    return _enc_varint(number << 3 | 2) + _enc_varint(len(payload)) + payload


@dataclass
class _Node:
    raw: memoryview
    fields: list[_Field]
    inputs: list[str]
    outputs: list[str]
    op_type: str = ""
    domain: str = ""
    ints: dict[str, int] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def parse(cls, raw: memoryview) -> _Node:
        fs = _fields(raw)
        node = cls(raw, fs, [], [])
        for f in fs:
            if f.wire != 2 and f.number in (_NODE_INPUT, _NODE_OUTPUT, _NODE_OP, _NODE_DOMAIN, _NODE_ATTR):
                raise ValueError("malformed node")
            text = lambda: bytes(raw[f.value:f.end]).decode("utf-8")  # noqa: E731
            if f.number == _NODE_INPUT:
                node.inputs.append(text())
            elif f.number == _NODE_OUTPUT:
                node.outputs.append(text())
            elif f.number == _NODE_OP:
                node.op_type = text()
            elif f.number == _NODE_DOMAIN:
                node.domain = text()
            elif f.number == _NODE_ATTR:
                a = raw[f.value:f.end]
                name, iv = "", None
                for af in _fields(a):
                    if af.number == _ATTR_NAME and af.wire == 2:
                        name = bytes(a[af.value:af.end]).decode("utf-8")
                    elif af.number == _ATTR_INT and af.wire == 0:
                        iv = _varint(a, af.value)[0]
                if iv is not None:
                    node.ints[name] = iv
        return node

    def rename(self, old: str, new: str) -> None:
        for names in (self.inputs, self.outputs):
            for k, v in enumerate(names):
                if v == old:
                    names[k] = new
                    self.changed = True

    def serialise(self) -> bytes:
        if not self.changed:
            return bytes(self.raw)
        ins, outs = iter(self.inputs), iter(self.outputs)
        parts = []
        for f in self.fields:
            if f.number == _NODE_INPUT:
                parts.append(_delimited(_NODE_INPUT, next(ins).encode("utf-8")))
            elif f.number == _NODE_OUTPUT:
                parts.append(_delimited(_NODE_OUTPUT, next(outs).encode("utf-8")))
            else:
                parts.append(bytes(self.raw[f.start:f.end]))
        return b"".join(parts)


class _Graph:
    """A model's graph: its nodes parsed, the rest of the model kept as bytes."""

    def __init__(self, model: bytes) -> None:
        self.model = memoryview(model)
        top = _fields(self.model)
        graphs = [f for f in top if f.number == _MODEL_GRAPH and f.wire == 2]
        if len(graphs) != 1:
            raise ValueError("the model has no graph")
        self.top, self.gfield = top, graphs[0]
        self.graph = self.model[self.gfield.value:self.gfield.end]
        self.gfields = _fields(self.graph)
        self.nodes: list[_Node | None] = []
        self._node_at: dict[int, int] = {}
        for k, f in enumerate(self.gfields):
            if f.number == _GRAPH_NODE and f.wire == 2:
                self._node_at[k] = len(self.nodes)
                self.nodes.append(_Node.parse(self.graph[f.value:f.end]))

    def readers(self, tensor: str) -> list[int]:
        return [k for k, n in enumerate(self.nodes) if n is not None and tensor in n.inputs]

    def producer(self, tensor: str) -> int | None:
        return next((k for k, n in enumerate(self.nodes) if n is not None and tensor in n.outputs), None)

    def remove_and_rename(self, k: int, old: str, new: str) -> None:
        """Drop node ``k`` and call ``old`` ``new`` in every other node."""
        self.nodes[k] = None
        for n in self.nodes:
            if n is not None:
                n.rename(old, new)

    def serialise(self) -> bytes:
        parts = []
        for k, f in enumerate(self.gfields):
            if k in self._node_at:
                node = self.nodes[self._node_at[k]]
                if node is not None:
                    parts.append(bytes(self.graph[f.start:f.end]) if not node.changed
                                 else _delimited(_GRAPH_NODE, node.serialise()))
            else:
                parts.append(bytes(self.graph[f.start:f.end]))
        graph = b"".join(parts)
        out = []
        for f in self.top:
            out.append(_delimited(_MODEL_GRAPH, graph) if f is self.gfield else bytes(self.model[f.start:f.end]))
        return b"".join(out)


@dataclass(frozen=True)
class CarriedTensor:
    """A tensor stage ``producer`` hands to stages ``consumers``, with its declared shape."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    shape: tuple[int | None, ...]


def _is(node: _Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain == NCHWC and not node.ints.get("channels_last", 0)


def block_carried(models: Sequence[bytes], carried: Sequence[CarriedTensor]) -> tuple[Mapping[int, bytes], tuple[str, ...]]:
    """Edit onnxruntime-optimised stage models (``models[k]``: stage k's, as onnxruntime saved it
    with ``optimized_model_filepath``) so that each of ``carried`` travels in the blocked layout.

    A tensor is left in NCHW unless its producer ends it with a ``ReorderOutput`` that nothing
    else in that graph reads, every consumer reads it only through one ``ReorderInput``, and its
    channels are a multiple of :data:`BLOCK` (so the blocked tensor has the declared shape).

    Returns:
        (``{stage index: edited model bytes}`` for the stages that changed, the names of the
        tensors that now travel blocked); both empty when none can.

    Raises:
        ValueError: a model is not a protobuf the edit can read.
    """
    graphs: dict[int, _Graph] = {}

    def graph(k: int) -> _Graph:
        if k not in graphs:
            graphs[k] = _Graph(models[k])
        return graphs[k]

    changed: set[int] = set()
    blocked: list[str] = []
    for t in carried:
        if len(t.shape) != 4 or t.shape[1] is None or t.shape[1] % BLOCK or not t.consumers:
            continue
        g = graph(t.producer)
        p = g.producer(t.name)
        if p is None or not _is(g.nodes[p], "ReorderOutput") or g.readers(t.name):
            continue
        takes = []
        for c in t.consumers:
            gc = graph(c)
            r = gc.readers(t.name)
            if len(r) != 1 or not _is(gc.nodes[r[0]], "ReorderInput"):
                break
            takes.append((gc, r[0], c))
        else:
            node = g.nodes[p]
            assert node is not None
            g.remove_and_rename(p, node.inputs[0], t.name)
            changed.add(t.producer)
            for gc, r, c in takes:
                node = gc.nodes[r]
                assert node is not None
                gc.remove_and_rename(r, node.outputs[0], t.name)
                changed.add(c)
            blocked.append(t.name)
    return {k: graphs[k].serialise() for k in sorted(changed)}, tuple(blocked)
