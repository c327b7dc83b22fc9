"""A null target for tests: drives compile, bundle writing, ``kdedge build`` and the runner
without any runtime library or hardware.

Its "compiled" file is a small JSON file that names the graph and its tensors; its sessions
compute deterministic outputs from the inputs with numpy (every output the sum of the inputs'
means per sample, broadcast to the manifest shape), can be aborted, and can be told to sleep
(``delay_s``) so that abort and deadline paths can be exercised.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdedge.io import atomic_write_text
from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, Target, TargetError


def _fake_handle() -> Any:
    from kdedge.targets.session import AbortHandle

    class _Handle(AbortHandle):
        __slots__ = ("_event",)

        def __init__(self) -> None:
            self._event = threading.Event()
            super().__init__(self._event.set)

    return _Handle()


class FakeSession:
    """Numpy-only session of a fake compiled file."""

    can_abort = True
    can_bind = False

    def __init__(self, path: Path, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 shapes: Mapping[str, Sequence[int]] | None = None, delay_s: float = 0.0) -> None:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "kdedge-fake" or doc.get("name") != name:
            raise TargetError(f"{path} is not a fake-target file for {name}; rebuild it with --target fake")
        if list(inputs) != doc["inputs"] or list(outputs) != doc["outputs"]:
            raise TargetError(f"{path} has inputs {doc['inputs']} and outputs {doc['outputs']}; the manifest lists "
                              f"{list(inputs)} and {list(outputs)}")
        self.name, self.inputs, self.outputs = name, tuple(inputs), tuple(outputs)
        self.shapes = {k: tuple(v) for k, v in (shapes or doc.get("shapes", {})).items()}
        self.delay_s = delay_s
        self.calls = 0

    def run(self, inputs: Mapping[str, np.ndarray], abort: Any = None) -> dict[str, np.ndarray]:
        from kdedge.targets.session import StageAborted

        self.calls += 1
        if self.delay_s and abort is not None:
            ev = getattr(abort, "_event", None)
            if ev is not None and ev.wait(self.delay_s):
                raise StageAborted(f"{self.name} was aborted")
        elif self.delay_s:
            threading.Event().wait(self.delay_s)
        if abort is not None and abort.aborted:
            raise StageAborted(f"{self.name} was aborted")
        n = next(iter(inputs.values())).shape[0]
        base = sum(np.asarray(inputs[k], np.float64).reshape(n, -1).mean(1) for k in self.inputs)
        out = {}
        for i, o in enumerate(self.outputs):
            shape = self.shapes.get(o, (1,))
            out[o] = (np.broadcast_to(base.reshape(n, *([1] * len(shape))), (n, *shape))
                      + np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 0.01 * (i + 1)
                      ).astype(np.float32)
        return out

    def abort_handle(self) -> Any:
        return _fake_handle()

    def close(self) -> None:
        pass


class FakeTarget(Target):
    """The null target (tests only)."""

    name = "fake"
    description = "null target for tests: JSON stand-in files, numpy sessions"
    caps = Capabilities(precisions=("fp32", "fp16"), dynamic_batch=True, can_abort=True, devices=("cpu",),
                        source="onnx")
    extra = "test"
    folder = "fake"
    suffix = ".json"

    def compile_graph(self, graph: GraphSource, spec: CompileSpec, out_dir: Path) -> CompiledFile:
        if graph.onnx is None and graph.module is None:
            raise TargetError(f"{graph.name}: nothing to compile (no ONNX file, no module)")
        dest = out_dir / f"{graph.name}{self.suffix}"
        doc = {"format": "kdedge-fake", "name": graph.name, "inputs": list(graph.inputs),
               "outputs": list(graph.outputs), "precision": spec.precision,
               "batch": [spec.min_batch, spec.opt_batch, spec.max_batch]}
        atomic_write_text(dest, json.dumps(doc))
        return CompiledFile(dest, spec.precision, {"batch_range": [spec.min_batch, spec.max_batch]})

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> FakeSession:
        return FakeSession(Path(path), name, inputs, outputs, shapes=options.get("shapes"),
                           delay_s=float(options.get("delay_s", 0.0)))

    def verify_here(self) -> bool:
        return False  # its outputs are not the model's: only the static check applies

    def check_compiled(self, root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Every graph's file names the manifest's graph and tensors."""
        for g in [*manifest["stages"], *manifest["prefixes"]]:
            doc = json.loads((root / g["files"][self.name]["path"]).read_text())
            if doc["inputs"] != [i["tensor"] for i in g["inputs"]] or doc["outputs"] != [o["tensor"] for o in g["outputs"]]:
                raise TargetError(f"{g['name']}: the fake file's tensors differ from the manifest's")
        return {"graphs": len(manifest["stages"]) + len(manifest["prefixes"])}

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> FakeSession:
        opts = dict(options or {})
        shapes = {o.tensor: tuple(int(d) for d in o.shape[1:]) for o in entry.outputs}
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], shapes=shapes, **opts)
