"""The ``onnx`` target: the stage ONNX files themselves, run with onnxruntime.

It is the reference every other target is verified against. Compiling copies the stage ONNX
the export layer wrote (FP32, or static INT8 QDQ); sessions are
:class:`kdedge.runtime.sessions.OrtSession` (abortable through ``RunOptions.terminate``, with
IOBinding).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, RunSpec, Target, TargetError


class OnnxRuntimeTarget(Target):
    """ONNX stage graphs run with onnxruntime (CPU, or the execution providers installed)."""

    name = "onnx"
    description = "ONNX stage graphs (torch.onnx dynamo exporter), run with onnxruntime; INT8 as static QDQ"
    caps = Capabilities(precisions=("fp32", "int8"), dynamic_batch=True, can_abort=True, devices=("cpu", "cuda"),
                        source="onnx")
    compile_requires = ("onnx",)
    run_requires = ("onnxruntime",)
    extra = "runtime"
    folder = "onnx"
    suffix = ".onnx"

    def compile_graph(self, graph: GraphSource, spec: CompileSpec, out_dir: Path) -> CompiledFile:
        if graph.onnx is None:
            raise TargetError(f"{graph.name}: the onnx target compiles from the stage ONNX file, none was given")
        dest = out_dir / f"{graph.name}{self.suffix}"
        if Path(graph.onnx).resolve() != dest.resolve():
            shutil.copyfile(graph.onnx, dest)
        return CompiledFile(dest, spec.precision)

    def run_key(self, run: RunSpec, bundle: Any = None) -> str:
        """Empty on the CPU (the profile file is ``<device>-<setting>.json``), ``onnx-cuda`` with
        the CUDA execution provider."""
        device = self.run_device(run, bundle)
        return "" if device == "cpu" else f"onnx-{device}"

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> Any:
        """An :class:`~kdedge.runtime.sessions.OrtSession`.

        Options: ``options`` (an :class:`~kdedge.runtime.sessions.OrtOptions`), or ``threads``,
        ``optimization``, ``providers`` to build one.
        """
        self.require("run")
        from kdedge.runtime.sessions import OrtOptions, OrtSession

        opts = options.pop("options", None)
        if opts is None:
            providers = options.pop("providers", None)
            if spec_device := options.pop("device", None):
                if spec_device == "cuda" and providers is None:
                    providers = ("CUDAExecutionProvider",)
            opts = OrtOptions(threads=options.pop("threads", None), optimization=options.pop("optimization", "all"),
                              providers=None if providers is None else tuple(providers))
        if options:
            raise TargetError(f"unknown onnx session option(s) {sorted(options)}; known: options, threads, "
                              "optimization, providers, device")
        return OrtSession(path, inputs, outputs, name=name, options=opts)
