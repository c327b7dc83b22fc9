"""Export targets: one module per runtime (onnxruntime, tensorrt, coreml, torch)."""

from __future__ import annotations
