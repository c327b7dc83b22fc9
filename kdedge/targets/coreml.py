"""The ``coreml`` target (coremltools 9): every stage and prefix converted to an ML program
(FP32 or FP16), all of them saved as the functions of one multifunction ``.mlpackage``
(``ct.utils.MultiFunctionDescriptor`` + ``save_multifunction``; weights shared between
functions are stored once).

Bundle layout::

    coreml/model.mlpackage      one package; function NAME is graph NAME (stage0, prefix1, …)
    coreml/stage0.json …        per graph: the package, its function, the package's sha256

The manifest's file entry of each graph is its small ``.json`` descriptor (a bundle lists one
file per graph); the descriptor pins the package's sha256, and sessions check it when they open
the package, so the package is covered by the bundle's checksums through the descriptors.

Conversion and the checks run on Linux (``MLModel(path, skip_model_load=True).get_spec()``:
function names, inputs, outputs, shapes and the op list against the manifest); prediction
needs macOS, where a session predicts with the chosen compute units.
"""

from __future__ import annotations

import contextlib
import io
import json
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
DESCRIPTOR_FORMAT = "kdedge-coreml-function"
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

    def __init__(self, descriptor: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 compute_units: str = "all") -> None:
        from kdedge.runtime.bundle import sha256_path

        doc = _read_descriptor(Path(descriptor), name)
        package = Path(descriptor).parent / doc["package"]
        if sha256_path(package) != doc["package_sha256"]:
            raise TargetError(f"{package} differs from the sha256 its descriptor {Path(descriptor).name} records; "
                              "the package was modified, re-export the bundle with --target coreml")
        if list(inputs) != doc["inputs"] or list(outputs) != doc["outputs"]:
            raise TargetError(f"{descriptor}: function {name} has inputs {doc['inputs']} and outputs {doc['outputs']}, "
                              f"the manifest lists {list(inputs)} and {list(outputs)}; re-export the bundle")
        if compute_units not in COMPUTE_UNITS:
            raise TargetError(f"unknown compute units {compute_units!r}; known: {', '.join(COMPUTE_UNITS)}")
        ct = import_coremltools()
        self.name, self.inputs, self.outputs = name, tuple(inputs), tuple(outputs)
        self._model = ct.models.MLModel(str(package), function_name=doc["function"],
                                        compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))

    def run(self, inputs: Mapping[str, np.ndarray], abort: Any = None) -> dict[str, np.ndarray]:
        res = self._model.predict({k: np.ascontiguousarray(inputs[k], np.float32) for k in self.inputs})
        return {k: np.asarray(res[k], np.float32) for k in self.outputs}

    def abort_handle(self) -> Any:
        raise TargetError(f"{self.name}: the coreml target cannot abort a running stage (can_abort is False)")

    def close(self) -> None:
        self.__dict__.pop("_model", None)


def _read_descriptor(path: Path, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TargetError(f"cannot read the CoreML descriptor {path}: {e}") from None
    if doc.get("format") != DESCRIPTOR_FORMAT or doc.get("function") != name:
        raise TargetError(f"{path} is not the CoreML descriptor of {name}; re-export the bundle with --target coreml")
    return doc


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
    suffix = ".json"

    def can_run(self) -> bool:
        return sys.platform == "darwin" and super().can_run()

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> CoreMLSession:
        """A :class:`CoreMLSession` (macOS only); option ``compute_units`` (``all``, ``cpu``, ``cpu_gpu``, ``cpu_ne``)."""
        if sys.platform != "darwin":
            raise TargetError("CoreML packages predict only on macOS; on this machine run the bundle's onnx or "
                              "torch files (--target onnx)")
        self.require("run")
        unknown = set(options) - {"compute_units"}
        if unknown:
            raise TargetError(f"unknown coreml session option(s) {sorted(unknown)}; known: compute_units")
        return CoreMLSession(path, name=name, inputs=inputs, outputs=outputs, **options)

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
        """Convert every graph, pack them as functions of ``out_dir/model.mlpackage``, write descriptors."""
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
        from kdedge.runtime.bundle import path_bytes, sha256_path

        digest, size = sha256_path(package), path_bytes(package)
        out = {}
        for g in graphs:
            doc = {"format": DESCRIPTOR_FORMAT, "package": PACKAGE, "function": g.name, "package_sha256": digest,
                   "inputs": list(g.inputs), "outputs": list(g.outputs), "precision": spec.precision,
                   "compute_units": spec.device, "batch_range": [1, max(spec.max_batch, 2)]}
            path = out_dir / f"{g.name}{self.suffix}"
            path.write_text(json.dumps(doc, indent=1) + "\n")
            out[g.name] = CompiledFile(path, spec.precision, {
                "package": f"{self.folder}/{PACKAGE}", "function": g.name, "package_sha256": digest,
                "package_bytes": size, "compute_units": spec.device, "coremltools": ct.__version__,
                "deployment_target": "iOS18/macOS15"})
        return out

    def check_compiled(self, root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """The Linux checks: the package's functions against the manifest; returns each function's ops.

        Raises:
            TargetError: a function is missing, or its inputs, outputs or shapes differ.
        """
        from kdedge.runtime.bundle import sha256_path

        graphs = [*manifest["stages"], *manifest["prefixes"]]
        docs = {g["name"]: _read_descriptor(root / g["files"][self.name]["path"], g["name"]) for g in graphs}
        packages = {(root / self.folder / d["package"]) for d in docs.values()}
        if len(packages) != 1:
            raise TargetError(f"the CoreML descriptors name {len(packages)} packages; expected one")
        package = packages.pop()
        digest = sha256_path(package)
        for name, doc in docs.items():  # before reading the package: it may be damaged
            if doc["package_sha256"] != digest:
                raise TargetError(f"{name}: the package's sha256 differs from the one its descriptor records; "
                                  "re-export the bundle with --target coreml")
        functions = package_functions(package)
        for g in graphs:
            name = g["name"]
            if name not in functions:
                raise TargetError(f"{package.name} has no function {name!r} (it has {sorted(functions)}); re-export")
            f = functions[name]
            want_in = [(i["tensor"], [int(d) for d in i["shape"][1:]]) for i in g["inputs"]]
            got_in = [(i["name"], i["shape"][1:]) for i in f["inputs"]]
            if got_in != want_in:
                raise TargetError(f"{name}: the package's inputs {got_in} differ from the manifest's {want_in}")
            if any(not i["ranges"] or i["ranges"][0][0] != 1 for i in f["inputs"]):
                raise TargetError(f"{name}: the package's inputs have no dynamic batch dimension starting at 1")
            want_out = [o["tensor"] for o in g["outputs"]]
            if f["outputs"] != want_out:
                raise TargetError(f"{name}: the package's outputs {f['outputs']} differ from the manifest's {want_out}")
        return {"package": f"{self.folder}/{PACKAGE}", "functions": functions}
