"""The ``torch`` target: each stage saved as a ``torch.export`` program (``.pt2``), loaded
without the model code and run on CPU or CUDA, carried tensors kept on the device between
stages, optional CUDA graphs.

Security: ``torch.export.load`` reads torch's own archive format, which is not a safe format
for files from untrusted sources; load only bundles you trust. The runner opens a ``.pt2``
only after the bundle reader has checked its sha256 against the manifest.

The tensor names of the bundle (``input``, ``stageK__NAME``) are stored in the archive
(``extra_files["kdedge.json"]``) and checked against the manifest when a session opens.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdedge.io import atomic_write
from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, Target, TargetError

_META = "kdedge.json"


def exact_fp32(torch: Any) -> None:
    """Turn TF32 off for CUDA convolutions and matrix products, process-wide.

    torch lets cuDNN run FP32 convolutions in TF32 by default (10-bit mantissa) on Ampere and
    later GPUs; the probabilities then differ from onnxruntime's by about 1e-3, up to 22 times
    the FP32 tolerance a bundle is verified at (measured on an H200, docs/targets.md). An FP32
    bundle promises FP32 numerics, so an FP32 CUDA session sets both flags off when it opens. The
    flags are global in torch; they are not restored, since another thread may be running a stage.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def cuda_available() -> bool:
    """torch is installed and sees a CUDA device (imports torch)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchSession:
    """One ``.pt2`` stage program.

    Args:
        path: the ``.pt2`` file.
        name, inputs, outputs: the graph name and tensor names (checked against the archive).
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        host_outputs: outputs returned as numpy arrays; the others stay torch tensors on
            ``device`` for the next stage (None: every output as numpy).
        cuda_graphs: capture one CUDA graph per batch size and replay it (CUDA only).
        threads: ``torch.set_num_threads`` (process-wide; None leaves it).
    """

    can_abort = False  # a running torch call cannot be cancelled
    can_bind = False

    def __init__(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 device: str = "cpu", host_outputs: Sequence[str] | None = None, cuda_graphs: bool = False,
                 threads: int | None = None) -> None:
        import torch

        self._torch = torch
        self.path, self.name = Path(path), name
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TargetError(f"torch target: device {device!r} asked for, but torch sees no CUDA device here; "
                              "run with --device cpu, or install a CUDA build of torch on a GPU machine")
        if cuda_graphs and not device.startswith("cuda"):
            raise TargetError("CUDA graphs need device 'cuda'; drop --cuda-graphs for the CPU")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        extra = {_META: ""}
        try:
            program = torch.export.load(str(self.path), extra_files=extra)
        except Exception as e:  # torch raises many types for a bad archive
            raise TargetError(f"torch cannot load {self.path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                              "re-export the bundle with --target torch (same torch major version)") from None
        meta = json.loads(extra[_META] or "{}")
        if meta.get("inputs") != list(self.inputs) or meta.get("outputs") != list(self.outputs):
            raise TargetError(f"{self.path} was compiled for inputs {meta.get('inputs')} and outputs "
                              f"{meta.get('outputs')}; the manifest lists {list(self.inputs)} and {list(self.outputs)}; "
                              "re-export the bundle")
        self.precision = meta.get("precision", "fp32")
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        if self.device.type == "cuda" and self.precision == "fp32":
            exact_fp32(torch)
        self._fn = program.module().to(self.device)
        self._host = set(self.outputs if host_outputs is None else host_outputs)
        self._graphs: dict[int, Any] = {}
        self._cuda_graphs = bool(cuda_graphs)
        self._lock = threading.Lock()

    def _tensor(self, a: Any) -> Any:
        torch = self._torch
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        if t.is_floating_point() and t.dtype != self._dtype:
            t = t.to(self._dtype)
        return t.to(self.device, non_blocking=True)

    def _call(self, args: list[Any]) -> tuple[Any, ...]:
        if not self._cuda_graphs:
            res = self._fn(*args)
        else:
            res = self._replay(args)
        return (res,) if isinstance(res, self._torch.Tensor) else tuple(res)

    def _replay(self, args: list[Any]) -> Any:
        """Capture a CUDA graph per batch size on first use, then copy inputs in and replay."""
        torch = self._torch
        n = int(args[0].shape[0])
        with self._lock:  # a captured graph has one set of static buffers
            g = self._graphs.get(n)
            if g is None:
                static_in = [a.clone() for a in args]
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):  # warm up (allocator, cuDNN autotuning) outside the capture
                        self._fn(*static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._fn(*static_in)
                g = self._graphs[n] = (graph, static_in, static_out)
            graph, static_in, static_out = g
            for s, a in zip(static_in, args):
                s.copy_(a, non_blocking=True)
            graph.replay()
            outs = (static_out,) if isinstance(static_out, torch.Tensor) else tuple(static_out)
            return tuple(o.clone() for o in outs)  # the next replay overwrites the static outputs

    def run(self, inputs: Mapping[str, Any], abort: Any = None) -> dict[str, Any]:
        torch = self._torch
        with torch.inference_mode():
            try:
                res = self._call([self._tensor(inputs[k]) for k in self.inputs])
            except TargetError:
                raise
            except Exception as e:
                raise RuntimeError(f"torch failed running {self.name}: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from None
            out = {}
            for name, t in zip(self.outputs, res):
                out[name] = t.float().cpu().numpy() if name in self._host else t
        return out

    def abort_handle(self) -> Any:
        raise TargetError(f"{self.name}: the torch target cannot abort a running stage (can_abort is False)")

    def close(self) -> None:
        self.__dict__.pop("_fn", None)
        self._graphs.clear()


class TorchExportTarget(Target):
    """Stages as ``torch.export`` programs; CPU and CUDA sessions."""

    name = "torch"
    description = "torch.export programs (.pt2), run by torch on CPU or CUDA (optional CUDA graphs)"
    caps = Capabilities(precisions=("fp32", "fp16"), dynamic_batch=True, can_abort=False, devices=("cpu", "cuda"),
                        source="module", cuda_graphs=True)
    compile_requires = ("torch",)
    run_requires = ("torch",)
    extra = "torch"
    folder = "torch"
    suffix = ".pt2"
    device_option = "device"
    run_options = ("threads", "cuda_graphs")

    def check(self, spec: CompileSpec) -> CompileSpec:
        spec = super().check(spec)
        if spec.precision == "fp16" and spec.device != "cuda":
            raise TargetError("the torch target compiles fp16 for device 'cuda' only (CPU half-precision kernels "
                              "are slow or missing); pass --device cuda, or --precision fp32")
        return spec

    def compile_graph(self, graph: GraphSource, spec: CompileSpec, out_dir: Path) -> CompiledFile:
        import torch

        if graph.module is None or graph.example is None:
            raise TargetError(f"{graph.name}: the torch target compiles from the stage module; it cannot be built "
                              "from a bundle's ONNX files; export with `kdedge export RUN --target torch`")
        module = graph.module.eval()
        example = tuple(graph.example)
        if spec.precision == "fp16":
            module = copy.deepcopy(module).half()
            example = tuple(a.half() if a.is_floating_point() else a for a in example)
        # min 1 would let torch.export specialise on batch 1; the example has batch >= 2
        batch = torch.export.Dim("batch", min=1, max=max(spec.max_batch, 2))
        dynamic = tuple({0: batch} for _ in example)
        try:
            with torch.no_grad():
                program = torch.export.export(module, example, dynamic_shapes=dynamic)
        except Exception as e:  # torch.export raises many types (UserError, Unsupported, …)
            raise TargetError(f"torch.export cannot export {graph.name}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        n_out = len(program.graph_signature.user_outputs)
        if n_out != len(graph.outputs):
            raise TargetError(f"{graph.name}: the exported program returns {n_out} tensors, the stage lists "
                              f"{len(graph.outputs)} outputs")
        meta = {"name": graph.name, "inputs": list(graph.inputs), "outputs": list(graph.outputs),
                "precision": spec.precision, "device": spec.device, "torch": torch.__version__,
                "batch_range": [1, max(spec.max_batch, 2)]}
        dest = out_dir / f"{graph.name}{self.suffix}"
        atomic_write(dest, lambda tmp: torch.export.save(program, str(tmp), extra_files={_META: json.dumps(meta)}),
                     keep_suffix=True)
        return CompiledFile(dest, spec.precision, {"device": spec.device, "torch": torch.__version__,
                                                   "batch_range": meta["batch_range"]})

    def verify_options(self, spec: CompileSpec) -> dict[str, Any]:
        """On the compiled device when torch sees it, else on the CPU (the report says which)."""
        device = spec.device or "cpu"
        return {"device": device if not device.startswith("cuda") or cuda_available() else "cpu"}

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> TorchSession:
        """A :class:`TorchSession`; options: ``device``, ``host_outputs``, ``cuda_graphs``, ``threads``."""
        self.require("run")
        known = {"device", "host_outputs", "cuda_graphs", "threads"}
        unknown = set(options) - known
        if unknown:
            raise TargetError(f"unknown torch session option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return TorchSession(path, name=name, inputs=inputs, outputs=outputs, **options)

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> TorchSession:
        """Carried tensors stay on the device; only the logits (the runner combines them) come to the host."""
        opts = dict(options or {})
        opts.setdefault("host_outputs", (entry.logits_tensor,))
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)
