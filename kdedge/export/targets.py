"""Export targets as data: which formats ``export`` writes, the precisions each accepts, and
what must be installed. A request a target cannot honour is rejected, never rewritten.

ONNX is the first target and the reference every other target is verified against; the
targets issue adds TensorRT, CoreML and torch programs behind the same table (each compiles
from the stage modules or from the stage ONNX files that this layer writes).

Example:
    >>> spec = check_request("onnx", "int8")
    >>> spec.precisions
    ('fp32', 'int8')
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from kdedge.export.errors import ExportError


@dataclass(frozen=True)
class ExportTarget:
    """Capabilities of one export target.

    Args:
        name: the ``--target`` name and the key of the stage files in the manifest.
        description: one line for ``kdedge export --help`` and ``kdedge doctor``.
        precisions: precisions it writes; the first is the default.
        requires: Python modules it needs at export time.
        extra: the pip extra that installs them.
        folder: folder of its stage files inside the bundle.
        suffix: stage file suffix.
        dynamic_batch: stage files accept any batch size.
    """

    name: str
    description: str
    precisions: tuple[str, ...]
    requires: tuple[str, ...]
    extra: str
    folder: str
    suffix: str
    dynamic_batch: bool = True

    def missing(self) -> list[str]:
        """Modules it needs that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


TARGETS: dict[str, ExportTarget] = {
    "onnx": ExportTarget(
        name="onnx",
        description="ONNX stage graphs (torch.onnx dynamo exporter), run with onnxruntime; INT8 as static QDQ",
        precisions=("fp32", "int8"),
        requires=("torch", "onnx", "onnxscript", "onnxruntime"),
        extra="train",
        folder="onnx",
        suffix=".onnx",
    ),
}

PRECISIONS = ("fp32", "fp16", "int8")


def check_request(target: str, precision: str) -> ExportTarget:
    """The target's spec, if it exists, is installed and writes ``precision``; else ExportError."""
    if target not in TARGETS:
        from kdedge.models import suggest

        raise ExportError(f"unknown export target {target!r}; {suggest(target, TARGETS)}")
    spec = TARGETS[target]
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision not in spec.precisions:
        raise ExportError(f"target {target!r} does not write precision {precision!r}; it writes: "
                          f"{', '.join(spec.precisions)}")
    missing = spec.missing()
    if missing:
        raise ExportError(f"target {target!r} needs {', '.join(missing)}, which is not installed; "
                          f"install it with: pip install 'kdedge[{spec.extra}]'")
    return spec


def format_table() -> str:
    """The target table as text (name, precisions, installed, description)."""
    rows = [f"{'target':<8} {'precisions':<12} {'installed':<10} description"]
    for t in TARGETS.values():
        ok = "yes" if not t.missing() else "no"
        rows.append(f"{t.name:<8} {','.join(t.precisions):<12} {ok:<10} {t.description}")
    return "\n".join(rows)
