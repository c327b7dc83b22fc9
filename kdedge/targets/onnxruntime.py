"""The ``onnx`` target: the stage ONNX files themselves, run with onnxruntime.

It is the reference every other target is verified against. Compiling copies the stage ONNX
the export layer wrote (FP32, or static INT8 QDQ); sessions are
:class:`kdedge.targets.ort_session.OrtSession` (abortable through ``RunOptions.terminate``, with
IOBinding).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, RunSpec, Target, TargetError


class OnnxRuntimeTarget(Target):
    """ONNX stage graphs run with onnxruntime (CPU, or the execution providers installed)."""

    name = "onnx"
    description = "ONNX stage graphs (torch.onnx dynamo exporter), run with onnxruntime; INT8 as static QDQ"
    caps = Capabilities(precisions=("fp32", "int8"), dynamic_batch=True, can_abort=True, devices=("cpu", "cuda"),
                        source="onnx", threads_per_session=True)
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
        the CUDA execution provider; ``shared`` (``onnx-cuda-shared``) with one shared pool."""
        device = self.run_device(run, bundle)
        key = "" if device == "cpu" else f"onnx-{device}"
        if run.shared_pool:
            key = f"{key}-shared" if key else "shared"
        return key

    def session_options(self, run: RunSpec, bundle: Any = None) -> Any:
        """An :class:`~kdedge.targets.ort_session.OrtOptions` for ``run`` (CUDA provider on a CUDA
        run device); what onnxruntime cannot honour (CUDA graphs, a device index) is refused."""
        from kdedge.targets.ort_session import OrtOptions

        providers = run.providers
        if run.device is None and providers is not None and "CUDAExecutionProvider" in providers:
            run = replace(run, device="cuda")
        super().session_options(replace(run, shared_pool=False), bundle)  # the checks of every target
        if providers is None and self.run_device(run, bundle) == "cuda":
            providers = ("CUDAExecutionProvider",)
        return OrtOptions(threads=run.threads, optimization=run.optimization,
                          providers=None if providers is None else tuple(providers), shared_pool=run.shared_pool)

    def options_key(self, options: Any, bundle: Any = None) -> str:
        from kdedge.targets.ort_session import OrtOptions

        if isinstance(options, OrtOptions):
            cuda = "CUDAExecutionProvider" in (options.providers or ())
            return self.run_key(RunSpec(device="cuda" if cuda else "cpu", shared_pool=options.shared_pool), bundle)
        return super().options_key(options, bundle)

    def options_threads(self, options: Any) -> int | None:
        return getattr(options, "resolved_threads", None) or super().options_threads(options)

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> Any:
        """An :class:`~kdedge.targets.ort_session.OrtSession`.

        Options: ``options`` (an :class:`~kdedge.targets.ort_session.OrtOptions`), or ``threads``,
        ``optimization``, ``providers`` to build one; ``declared``: the manifest's
        ``{tensor: (shape, dtype)}`` to check the graph against.
        """
        self.require("run")
        from kdedge.targets.ort_session import OrtOptions, OrtSession

        opts = options.pop("options", None)
        declared = options.pop("declared", None)
        if opts is None:
            providers = options.pop("providers", None)
            if spec_device := options.pop("device", None):
                if spec_device == "cuda" and providers is None:
                    providers = ("CUDAExecutionProvider",)
            opts = OrtOptions(threads=options.pop("threads", None), optimization=options.pop("optimization", "all"),
                              providers=None if providers is None else tuple(providers))
        if options:
            raise TargetError(f"unknown onnx session option(s) {sorted(options)}; known: options, threads, "
                              "optimization, providers, device, declared")
        return OrtSession(path, inputs, outputs, name=name, options=opts, declared=declared)

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> Any:
        """An :class:`~kdedge.targets.ort_session.OrtSession` for a bundle's stage entry, its graph
        checked against the entry's shapes and dtypes (``options``: an ``OrtOptions``, a dict of
        :meth:`open` options, or None)."""
        opts = {"options": options} if hasattr(options, "__dataclass_fields__") else dict(options or {})
        opts["declared"] = {t.tensor: (t.shape, t.dtype) for t in (*entry.inputs, *entry.outputs)}
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)
