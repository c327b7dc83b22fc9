"""The ``coreml`` target (coremltools 9): every stage and prefix converted to an ML program
(FP32 or FP16), all of them saved as the functions of one multifunction ``.mlpackage``
(``ct.utils.MultiFunctionDescriptor`` + ``save_multifunction``; weights shared between
functions are stored once).

Bundle layout::

    coreml/model.mlpackage      one package; function NAME is graph NAME (stage0, prefix1, …)

Every graph's manifest entry names the package itself, with the graph's ``function``
(``{"path": "coreml/model.mlpackage", "function": "stage0", …}``; manifest schema 2 lets the
entries of one target share a path this way). The bundle reader checks the package's digest
(a directory digest, docs/bundle.md) once, before any session opens it.

Conversion and the checks run on Linux (``MLModel(path, skip_model_load=True).get_spec()``:
function names, inputs, outputs, shapes and the op list against the manifest); prediction
needs macOS, where a session predicts with the chosen compute units.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, Target, TargetError

PACKAGE = "model.mlpackage"
COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY", "cpu_gpu": "CPU_AND_GPU", "cpu_ne": "CPU_AND_NE"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools prints progress bars and version warnings on every conversion."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def import_coremltools() -> Any:
    """coremltools, imported quietly (it warns about untested torch and scikit-learn versions)."""
    with _quiet():
        import coremltools as ct
    return ct


def read_spec(package: Path) -> Any:
    """The package's protobuf spec, without loading the model (works on Linux)."""
    ct = import_coremltools()
    with _quiet():
        return ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def package_functions(package: Path) -> dict[str, dict[str, Any]]:
    """``{function: {"inputs": [(name, shape, [lo, hi] of dim 0)], "outputs": [names], "ops": [types]}}``."""
    spec = read_spec(package)
    out: dict[str, dict[str, Any]] = {}
    for f in spec.description.functions:
        ins = []
        for i in f.input:
            arr = i.type.multiArrayType
            ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
            ins.append({"name": i.name, "shape": [int(d) for d in arr.shape], "ranges": ranges})
        out[f.name] = {"inputs": ins, "outputs": [o.name for o in f.output]}
    for name, fn in spec.mlProgram.functions.items():
        block = fn.block_specializations[fn.opset]
        if name in out:
            out[name]["ops"] = sorted({op.type for op in block.operations})
    return out


class CoreMLSession:
    """One function of the package, predicting on macOS."""

    can_abort = False
    can_bind = False

    def __init__(self, package: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 function: str | None = None, compute_units: str = "all") -> None:
        package = _check_package(package)
        function = function or name
        if compute_units not in COMPUTE_UNITS:
            raise TargetError(f"unknown compute units {compute_units!r}; known: {', '.join(COMPUTE_UNITS)}")
        functions = package_functions(package)  # the spec only: a mismatch fails before the model loads
        if function not in functions:
            raise TargetError(f"{package} has no function {function!r} (it has {sorted(functions)}); "
                              "re-export the bundle with --target coreml")
        got_in = [i["name"] for i in functions[function]["inputs"]]
        if got_in != list(inputs) or functions[function]["outputs"] != list(outputs):
            raise TargetError(f"{package}: function {function} has inputs {got_in} and outputs "
                              f"{functions[function]['outputs']}, the manifest lists {list(inputs)} and "
                              f"{list(outputs)}; re-export the bundle with --target coreml")
        ct = import_coremltools()
        self.name, self.inputs, self.outputs = name, tuple(inputs), tuple(outputs)
        self._model = ct.models.MLModel(str(package), function_name=function,
                                        compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))

    def run(self, inputs: Mapping[str, np.ndarray], abort: Any = None) -> dict[str, np.ndarray]:
        res = self._model.predict({k: np.ascontiguousarray(inputs[k], np.float32) for k in self.inputs})
        return {k: np.asarray(res[k], np.float32) for k in self.outputs}

    def abort_handle(self) -> Any:
        raise TargetError(f"{self.name}: the coreml target cannot abort a running stage (can_abort is False)")

    def close(self) -> None:
        self.__dict__.pop("_model", None)


def _check_package(path: str | Path) -> Path:
    """``path`` if it is an ``.mlpackage`` directory; bundles of manifest schema 1 named a
    per-graph ``.json`` descriptor instead, which this kdedge no longer reads."""
    path = Path(path)
    if path.suffix != ".mlpackage" or not path.is_dir():
        raise TargetError(f"{path} is not a CoreML .mlpackage directory (bundles of manifest schema 1 named "
                          "per-graph .json descriptors); re-export the bundle with --target coreml")
    return path


class CoreMLTarget(Target):
    """ML programs in one multifunction package; sessions on macOS."""

    name = "coreml"
    description = "CoreML ML programs (coremltools 9), all stages in one multifunction .mlpackage; predicts on macOS"
    caps = Capabilities(precisions=("fp16", "fp32"), dynamic_batch=True, can_abort=False,
                        devices=tuple(COMPUTE_UNITS), source="module", one_package=True)
    compile_requires = ("coremltools", "torch")
    run_requires = ("coremltools",)
    extra = "coreml"
    folder = "coreml"
    suffix = ".mlpackage"
    device_option = "compute_units"  # the run device of a RunSpec is the compute units

    def can_run(self) -> bool:
        return sys.platform == "darwin" and super().can_run()

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> CoreMLSession:
        """A :class:`CoreMLSession` of function ``function`` (default: ``name``) of the package at
        ``path`` (macOS only); option ``compute_units`` (``all``, ``cpu``, ``cpu_gpu``, ``cpu_ne``)."""
        if sys.platform != "darwin":
            raise TargetError("CoreML packages predict only on macOS; on this machine run the bundle's onnx or "
                              "torch files (--target onnx)")
        self.require("run")
        unknown = set(options) - {"compute_units", "function"}
        if unknown:
            raise TargetError(f"unknown coreml session option(s) {sorted(unknown)}; known: compute_units, function")
        return CoreMLSession(path, name=name, inputs=inputs, outputs=outputs, **options)

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> CoreMLSession:
        """The graph's function of the bundle's package (the entry's ``function``)."""
        opts = dict(options or {})
        opts["function"] = entry.files[self.name].function if self.name in entry.files else None
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)

    # -- compile -------------------------------------------------------------------------------
    def convert(self, graph: GraphSource, spec: CompileSpec) -> Any:
        """One graph as an in-memory ML program (``ct.convert`` of its ``torch.export`` program)."""
        import torch

        ct = import_coremltools()
        if graph.module is None or graph.example is None:
            raise TargetError(f"{graph.name}: the coreml target converts the stage module; it cannot be built from "
                              "a bundle's ONNX files; export with `kdedge export RUN --target coreml`")
        hi = max(spec.max_batch, 2)
        batch = torch.export.Dim("batch", min=1, max=hi)
        try:
            with torch.no_grad(), _quiet():
                program = torch.export.export(graph.module.eval(), tuple(graph.example),
                                              dynamic_shapes=tuple({0: batch} for _ in graph.example))
                program = program.run_decompositions({})
                inputs = [ct.TensorType(name=n, dtype=np.float32,
                                        shape=ct.Shape((ct.RangeDim(1, hi, default=spec.opt_batch), *s)))
                          for n, s in zip(graph.inputs, graph.input_shapes)]
                return ct.convert(program, convert_to="mlprogram", inputs=inputs,
                                  outputs=[ct.TensorType(name=n) for n in graph.outputs],
                                  compute_precision=ct.precision.FLOAT16 if spec.precision == "fp16"
                                  else ct.precision.FLOAT32,
                                  compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[spec.device or "all"]),
                                  minimum_deployment_target=ct.target.iOS18)
        except TargetError:
            raise
        except Exception as e:  # coremltools raises NotImplementedError/ValueError/RuntimeError for unsupported ops
            first = str(e).splitlines()[0] if str(e) else ""
            raise TargetError(f"coremltools cannot convert {graph.name}: {type(e).__name__}: {first}; the stage uses "
                              "an op or shape CoreML does not support (see docs/targets.md, op coverage)") from None

    def compile(self, graphs: Sequence[GraphSource], spec: CompileSpec, out_dir: Path) -> dict[str, CompiledFile]:
        """Convert every graph and pack them as the functions of ``out_dir/model.mlpackage``.

        Returns:
            one :class:`CompiledFile` per graph, all with the package's path; ``extra["function"]``
            is the graph's function (it becomes the manifest entry's ``function``).
        """
        spec = self.check(spec)
        self.require("compile")
        ct = import_coremltools()
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".coreml-", dir=out_dir))
        try:
            desc = ct.utils.MultiFunctionDescriptor()
            for g in graphs:
                model = self.convert(g, spec)
                single = work / f"{g.name}.mlpackage"
                with _quiet():
                    model.save(str(single))
                desc.add_function(str(single), src_function_name="main", target_function_name=g.name)
            desc.default_function_name = graphs[0].name
            tmp_pkg = work / PACKAGE
            with _quiet():
                ct.utils.save_multifunction(desc, str(tmp_pkg))
            package = out_dir / PACKAGE
            if package.exists():
                shutil.rmtree(package)
            os.replace(tmp_pkg, package)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # "device" is what the runner reads as the files' device (Target.run_device); for CoreML it
        # is the compute units, recorded under that name too for readers of the manifest
        facts = {"device": spec.device, "compute_units": spec.device, "coremltools": ct.__version__,
                 "deployment_target": "iOS18/macOS15", "batch_range": [1, max(spec.max_batch, 2)]}
        return {g.name: CompiledFile(package, spec.precision, {"function": g.name, **facts}) for g in graphs}

    def check_compiled(self, root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """The Linux checks: the package's functions against the manifest; returns each function's ops.

        Every graph's entry must name the one package and a function of it, with the manifest's
        input names and shapes (a dynamic batch starting at 1) and output names.

        Raises:
            TargetError: entries naming several packages or no function, a package that differs
                from its recorded sha256, a missing function, or different inputs, outputs or shapes.
        """
        from kdedge.bundle.errors import BundleError
        from kdedge.bundle.files import sha256_path

        graphs = [*manifest["stages"], *manifest["prefixes"]]
        entries = {g["name"]: g["files"][self.name] for g in graphs}
        paths = sorted({e["path"] for e in entries.values()})
        if len(paths) != 1:
            raise TargetError(f"the coreml entries name {len(paths)} files {paths}; expected one package")
        package = _check_package(root / paths[0])
        unnamed = [n for n, e in entries.items() if not e.get("function")]
        if unnamed:
            raise TargetError(f"the coreml entries of {', '.join(unnamed)} name no function of {paths[0]}; re-export")
        try:  # before coremltools parses the package: it may be damaged
            digest = sha256_path(package)
        except BundleError as e:
            raise TargetError(str(e)) from None
        if {e.get("sha256") for e in entries.values()} != {digest}:
            raise TargetError(f"{paths[0]} differs from the sha256 its manifest entries record; "
                              "re-export the bundle with --target coreml")
        functions = package_functions(package)
        for g in graphs:
            name, function = g["name"], entries[g["name"]]["function"]
            if function not in functions:
                raise TargetError(f"{package.name} has no function {function!r} for {name} (it has "
                                  f"{sorted(functions)}); re-export")
            f = functions[function]
            want_in = [(i["tensor"], [int(d) for d in i["shape"][1:]]) for i in g["inputs"]]
            got_in = [(i["name"], i["shape"][1:]) for i in f["inputs"]]
            if got_in != want_in:
                raise TargetError(f"{name}: the package's inputs {got_in} differ from the manifest's {want_in}")
            if any(not i["ranges"] or i["ranges"][0][0] != 1 for i in f["inputs"]):
                raise TargetError(f"{name}: the package's inputs have no dynamic batch dimension starting at 1")
            want_out = [o["tensor"] for o in g["outputs"]]
            if f["outputs"] != want_out:
                raise TargetError(f"{name}: the package's outputs {f['outputs']} differ from the manifest's {want_out}")
        return {"package": paths[0], "functions": functions}
