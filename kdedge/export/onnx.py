"""One stage module to one ONNX file: torch.onnx's dynamo exporter with a dynamic batch
dimension, the legacy TorchScript exporter as the fallback, optional onnxsim simplification.

The graph's inputs and outputs carry the bundle's tensor names (``input``, ``stageK__NAME``),
every input and output has a symbolic batch dimension, and constants are folded (the dynamo
exporter's ``optimize=True``; the legacy exporter's ``do_constant_folding``), which also folds
BatchNorm into the preceding convolution. A graph that comes out with a fixed batch size or
other names than asked is rejected: the runtime wires stages by these names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdedge.export.errors import ExportError

EXPORTERS = ("auto", "dynamo", "legacy")
MIN_OPSET = 13

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
           torch.uint8: "uint8", torch.bool: "bool"}


def dtype_name(t: Tensor) -> str:
    """Manifest dtype name of a tensor."""
    if t.dtype not in _DTYPES:
        raise ExportError(f"stage tensors must be float32/float16/int64/int32/uint8/bool, got {t.dtype}")
    return _DTYPES[t.dtype]


def max_opset() -> int:
    """Highest opset the installed onnx knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= hi:
        raise ExportError(f"opset must be an integer between {MIN_OPSET} and {hi} (the installed onnx), got {opset!r}")


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' progress prints and warnings (they go to stdout and stderr)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_REGISTRIES: dict[str, Any] = {}


@contextlib.contextmanager
def _reuse_torchlib_registry() -> Any:
    """Build torch.onnx's operator registry once per process instead of once per graph.

    The dynamo exporter rebuilds its registry of torchlib functions on every call, parsing the
    source of some 3,000 functions (about 2.5 s of the ~3 s one small stage takes here); a
    bundle exports several graphs. The registry is only read during an export (it is mutated
    only for a ``custom_translation_table``, which kdedge does not pass), so one instance per
    opset is shared. This patches a private torch API for the duration of the call and is
    skipped when that API is not there; every exported graph is verified against torch anyway.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, KeyError, AttributeError):
        yield
        return

    def cached(cls: Any, *args: Any, **kwargs: Any) -> Any:
        key = repr((cls, args, sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def _export_dynamo(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: Sequence[str],
                   outputs: Sequence[str], opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args)
    with _quiet(), _reuse_torchlib_registry():
        program = torch.onnx.export(module, args, None, dynamo=True, input_names=list(inputs),
                                    output_names=list(outputs), dynamic_shapes=dynamic, opset_version=opset,
                                    optimize=True, verbose=False, external_data=False)
        if program is None:
            raise RuntimeError("the dynamo exporter returned no program")
        program.save(str(path), external_data=False)


def _export_legacy(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: Sequence[str],
                   outputs: Sequence[str], opset: int) -> None:
    axes = {n: {0: "batch"} for n in [*inputs, *outputs]}
    with _quiet():
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)


def check_graph(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """The file's inputs/outputs have exactly these names and a symbolic batch dimension."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(inputs) or got_out != list(outputs):
        raise ExportError(f"{path.name}: exported names are {got_in} -> {got_out}, expected {list(inputs)} -> "
                          f"{list(outputs)}")
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            fixed = dims[0].dim_value if dims else "no shape"
            raise ExportError(f"{path.name}: {v.name} has a fixed batch dimension ({fixed}); the stage code "
                              "specialises on the batch size (avoid x.shape[0] in reshapes; use flatten/unflatten)")


def _strip_nodes(graph: Any) -> None:
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_nodes(attr.g)
            for g in attr.graphs:
                _strip_nodes(g)


def strip_debug_info(path: Path) -> None:
    """Drop per-node debug metadata (source stack traces, module paths) that the dynamo
    exporter writes: on small stages it is most of the file, and it names local source paths."""
    import onnx

    model = onnx.load(str(path))
    _strip_nodes(model.graph)
    for fn in model.functions:
        _strip_nodes(fn)
    onnx.save(model, str(path))


def simplify_file(path: Path) -> None:
    """Simplify an ONNX file in place with onnxsim (it keeps the symbolic batch)."""
    try:
        import onnx
        import onnxsim
    except ImportError:
        raise ExportError("simplify=True needs onnxsim, which is not installed; install it with: "
                          "pip install 'kdedge[simplify]'") from None
    model = onnx.load(str(path))
    try:
        with _quiet():
            simplified, ok = onnxsim.simplify(model)
    except Exception as e:  # onnxsim raises plain RuntimeErrors from C++
        raise ExportError(f"onnxsim could not simplify {path.name}: {e}; export without --simplify") from None
    if not ok:
        raise ExportError(f"onnxsim's check failed on {path.name}; export without --simplify")
    onnx.save(simplified, str(path))


def export_graph(module: nn.Module, args: tuple[Tensor, ...], path: str | Path, *, inputs: Sequence[str],
                 outputs: Sequence[str], opset: int = 18, exporter: str = "auto", simplify: bool = False) -> dict[str, Any]:
    """Export one stage module to ``path``.

    Args:
        module: the stage (``forward(*inputs) -> tuple of outputs``), in eval mode.
        args: example inputs (batch size >= 2, so that no exporter specialises on batch 1).
        inputs, outputs: graph tensor names, in forward order.
        opset: ONNX opset.
        exporter: ``auto`` (dynamo, then legacy if dynamo fails), ``dynamo`` or ``legacy``.
        simplify: run onnxsim on the result.

    Returns:
        ``{"exporter": "dynamo" | "legacy", "opset": opset, "simplified": bool, "fallback_reason": str | None}``.

    Raises:
        ExportError: no exporter produced a valid graph.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    check_opset(opset)
    path = Path(path)
    module = module.eval()
    reason = None
    used = None
    order = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    for name in order:
        try:
            with torch.no_grad():
                (_export_dynamo if name == "dynamo" else _export_legacy)(module, args, path, inputs, outputs, opset)
            check_graph(path, inputs, outputs)
            strip_debug_info(path)
            used = name
            break
        except Exception as e:  # exporter failures come as many types; the next exporter is the fallback
            reason = f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            path.unlink(missing_ok=True)
    if used is None:
        raise ExportError(f"could not export {path.stem} to ONNX ({reason})")
    if simplify:
        simplify_file(path)
        check_graph(path, inputs, outputs)
    return {"exporter": used, "opset": opset, "simplified": bool(simplify),
            "fallback_reason": reason if used != order[0] else None}
