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
from typing import Any, Callable, Mapping, Sequence

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
        model, optimised_to = options.pop("model", None), options.pop("optimised_to", None)
        if opts is None:
            providers = options.pop("providers", None)
            if spec_device := options.pop("device", None):
                if spec_device == "cuda" and providers is None:
                    providers = ("CUDAExecutionProvider",)
            opts = OrtOptions(threads=options.pop("threads", None), optimization=options.pop("optimization", "all"),
                              providers=None if providers is None else tuple(providers))
        if options:
            raise TargetError(f"unknown onnx session option(s) {sorted(options)}; known: options, threads, "
                              "optimization, providers, device, declared, model, optimised_to")
        return OrtSession(path, inputs, outputs, name=name, options=opts, declared=declared, model=model,
                          optimised_to=optimised_to)

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> Any:
        """An :class:`~kdedge.targets.ort_session.OrtSession` for a bundle's stage entry, its graph
        checked against the entry's shapes and dtypes (``options``: an ``OrtOptions``, a dict of
        :meth:`open` options, or None)."""
        opts = {"options": options} if hasattr(options, "__dataclass_fields__") else dict(options or {})
        opts["declared"] = {t.tensor: (t.shape, t.dtype) for t in (*entry.inputs, *entry.outputs)}
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)

    def open_stages(self, bundle: Any, entries: Sequence[Any], options_for: Callable[[str], Any]) -> list[Any]:
        """The stage sessions, with the feature maps one stage hands to the next kept in
        onnxruntime's blocked (NCHWc) layout where that can be done on this CPU
        (:mod:`kdedge.targets.ort_blocked`): the graphs as onnxruntime optimised them here, minus
        the layout conversions at the carried tensors. The edited chain is checked against the
        bundle's graphs on a sample (identical logits of every stage) before it replaces them.
        Only with ``KDEDGE_ORT_BLOCKED=1`` (opt-in), the CPU provider and the full optimisation
        level; otherwise the bundle's graphs run as they are. A session's ``blocked`` lists the
        tensors it exchanges blocked."""
        import tempfile

        from kdedge.targets.ort_blocked import block_carried, blocked_carry_enabled

        if not blocked_carry_enabled():
            return super().open_stages(bundle, entries, options_for)
        given = {e.name: options_for(e.name) for e in entries}
        options = [_as_ort_options(given[e.name]) for e in entries]
        carried = carried_tensors(entries)
        if not carried or not all(o is not None and _blockable(o) for o in options):
            return super().open_stages(bundle, entries, given.__getitem__)
        sessions: list[Any] = []
        edited_sessions: dict[int, Any] = {}
        try:
            with tempfile.TemporaryDirectory(prefix="kdedge-ort-") as tmp:
                saved = [Path(tmp) / f"{k}.onnx" for k in range(len(entries))]
                for e, o, path in zip(entries, options, saved):
                    sessions.append(self.open_entry(bundle, e, {"options": o, "optimised_to": path}))
                try:
                    edited, blocked = block_carried([p.read_bytes() for p in saved], carried)
                except (OSError, ValueError):
                    edited, blocked = {}, ()
            for k, model in edited.items():
                edited_sessions[k] = self.open_entry(bundle, entries[k], {"options": replace(options[k], optimization="disable"),
                                                                          "model": model})
            if edited_sessions and _same_logits(entries, sessions, {**dict(enumerate(sessions)), **edited_sessions},
                                                bundle.input_shape):
                for k, s in edited_sessions.items():
                    sessions[k].close()
                    s.blocked = tuple(t.name for t in carried if t.name in blocked and (k == t.producer or k in t.consumers))
                    sessions[k] = s
            elif edited_sessions:
                import warnings

                warnings.warn("the stage graphs with carried tensors in onnxruntime's blocked layout answered "
                              "differently from the bundle's; running the bundle's graphs as they are", RuntimeWarning,
                              stacklevel=2)
                for s in edited_sessions.values():
                    s.close()
        except BaseException:
            for s in [*sessions, *edited_sessions.values()]:
                s.close()
            raise
        return sessions


def carried_tensors(entries: Sequence[Any]) -> list[Any]:
    """The feature maps a stage hands to later stages (not the logits), with their readers."""
    from kdedge.targets.ort_blocked import CarriedTensor

    out = []
    for k, e in enumerate(entries):
        for o in e.outputs:
            readers = tuple(j for j, e2 in enumerate(entries) if any(i.tensor == o.tensor for i in e2.inputs))
            if o.tensor != e.logits_tensor and readers and o.dtype == "float32":
                out.append(CarriedTensor(o.tensor, k, readers, tuple(o.shape)))
    return out


def _as_ort_options(options: Any) -> Any:
    from kdedge.targets.ort_session import OrtOptions

    if options is None:
        return OrtOptions()
    if isinstance(options, OrtOptions):
        return options
    return None  # a dict of open() options: opened as given


def _blockable(options: Any) -> bool:
    """onnxruntime makes NCHWc graphs on the CPU provider at the full optimisation level only."""
    return options.optimization in ("all", "layout") and tuple(options.providers or ("CPUExecutionProvider",)) == (
        "CPUExecutionProvider",)


def _same_logits(entries: Sequence[Any], reference: Sequence[Any], edited: Mapping[int, Any],
                 input_shape: Sequence[Any]) -> bool:
    """Both chains give identical logits at every stage on a fixed sample of two images."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2, *[int(d) for d in input_shape[1:]])).astype(np.float32)
    given = {i.tensor for e in entries for i in e.inputs} - {o.tensor for e in entries for o in e.outputs}

    def chain(sessions: Mapping[int, Any] | Sequence[Any]) -> list[Any]:
        carried: dict[str, Any] = dict.fromkeys(given, x)
        logits = []
        for k, e in enumerate(entries):
            carried.update(sessions[k].run({i.tensor: carried[i.tensor] for i in e.inputs}))
            logits.append(carried[e.logits_tensor])
        return logits

    return all(np.array_equal(a, b) for a, b in zip(chain(reference), chain(edited)))
