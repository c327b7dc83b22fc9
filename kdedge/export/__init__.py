"""Export: slice a trained model into stages, write ONNX, verify parity, quantize, write a bundle.

Entry points:

- :func:`export` (a model in memory) and :func:`export_run` (a run directory) write a bundle;
- :func:`inspect_bundle` summarises one; :func:`evaluate_bundle` runs one with onnxruntime.

The bundle format is documented in ``docs/bundle.md``; reading bundles needs no torch
(:mod:`kdedge.bundle.manifest`).

Example:
    >>> from kdedge.export import export
    >>> export(model, "model.kdedge", info=splits.info, val_data=splits.val)
"""

from __future__ import annotations

from typing import Any

from kdedge.export.errors import ExportError

# The targets (what export can write, their capabilities) are kdedge.targets.TARGETS.
__all__ = ["ExportError", "evaluate_bundle", "evaluate_bundle_on_data", "export",
           "export_run", "format_inspect", "format_report", "inspect_bundle"]

# The heavy modules (torch, onnx) load on first use, so that `import kdedge.export` stays cheap
# for `kdedge --help`; the names are plain attributes once loaded.
_LAZY = {
    "export": "kdedge.export.pipeline",
    "export_run": "kdedge.export.pipeline",
    "inspect_bundle": "kdedge.export.inspect",
    "evaluate_bundle": "kdedge.export.evaluate",
    "evaluate_bundle_on_data": "kdedge.export.evaluate",
    "format_report": "kdedge.export.verify",
    "format_inspect": "kdedge.export.inspect",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdedge.export' has no attribute {name!r}")
