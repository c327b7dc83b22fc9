"""The target interface: compile stage graphs to a runtime's files, open them as sessions.

A target declares what it can do as data (:class:`Capabilities`), and :meth:`Target.check`
refuses a request it cannot honour with a :class:`TargetError` naming the fix; nothing is ever
silently rewritten (an FP16 request on a target without FP16 fails, it does not become FP32).

Two halves, with different dependencies:

- **compile** (export host, or the device for add-on targets such as TensorRT):
  ``compile(graphs, spec, out_dir) -> {graph name: CompiledFile}``. A target reads either the
  torch stage module (``source="module"``: torch programs, CoreML) or the stage ONNX file the
  export layer wrote (``source="onnx"``: onnxruntime, TensorRT).
- **open** (the device; no torch for onnxruntime/TensorRT/CoreML):
  ``open(path, name=, inputs=, outputs=, **options) -> Session`` with the session interface of
  :mod:`kdedge.targets.session`; ``open_entry(bundle, entry, options)`` is the runner's
  factory and reads the path and tensor names from the manifest.

Example:
    >>> t = get_target("torch")
    >>> spec = t.check(CompileSpec(precision="fp32", device="cpu"))
    >>> files = t.compile([graph], spec, Path("bundle/torch"))
    >>> s = t.open(files["stage0"].path, name="stage0", inputs=("input",), outputs=("stage0__logits",))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Capabilities", "CompileSpec", "CompiledFile", "GraphSource", "RunSpec", "Target", "TargetError",
           "TargetUnavailable", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "int8")


class TargetError(ValueError):
    """A request a target cannot honour, or a file it refuses to run (one line: what and the fix)."""


class TargetUnavailable(TargetError):
    """The target's library (or device) is missing here; the message names what to install."""


@dataclass(frozen=True)
class Capabilities:
    """What a target can do.

    Args:
        precisions: precisions it compiles; the first is the default.
        dynamic_batch: its files accept any batch size in the compiled range.
        can_abort: a running stage call can be cancelled (the deadline watchdog).
        devices: devices its sessions run on (``cpu``, ``cuda``, ``ane``, ``gpu``).
        source: what compile reads: ``module`` (torch stage module) or ``onnx`` (stage ONNX).
        one_package: all graphs go into one file (CoreML multifunction package).
        max_batch: the largest batch it compiles for (None: unbounded).
        cuda_graphs: its sessions can capture and replay CUDA graphs (``--cuda-graphs``).
        threads_per_session: each session has its own CPU thread count, so graphs of one runner
            can run with different counts (``--threads auto``).
    """

    precisions: tuple[str, ...]
    dynamic_batch: bool
    can_abort: bool
    devices: tuple[str, ...]
    source: str
    one_package: bool = False
    max_batch: int | None = None
    cuda_graphs: bool = False
    threads_per_session: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"precisions": list(self.precisions), "dynamic_batch": self.dynamic_batch,
                "can_abort": self.can_abort, "devices": list(self.devices), "source": self.source,
                "one_package": self.one_package, "max_batch": self.max_batch, "cuda_graphs": self.cuda_graphs,
                "threads_per_session": self.threads_per_session}


@dataclass(frozen=True)
class CompileSpec:
    """What to compile.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8``.
        device: the device the files are for (``cpu``, ``cuda``; CoreML: ``all``, ``cpu``,
            ``cpu_gpu``, ``cpu_ne`` compute units).
        min_batch, opt_batch, max_batch: the batch range (TensorRT optimisation profile,
            CoreML/torch dynamic dimension bounds).
        options: target-specific options (documented by each target).
    """

    precision: str = "fp32"
    device: str | None = None
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in ("min_batch", "opt_batch", "max_batch"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TargetError(f"{k} must be a positive integer, got {v!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise TargetError(f"batch range must satisfy min <= opt <= max, got {self.min_batch} <= "
                              f"{self.opt_batch} <= {self.max_batch}; pass e.g. --min-batch 1 --opt-batch 1 "
                              "--max-batch 64")

    def with_device(self, device: str) -> CompileSpec:
        return replace(self, device=device)


@dataclass(frozen=True)
class RunSpec:
    """How the runner opens a target's sessions on this device (``kdedge run/profile --device
    --cuda-graphs --threads``).

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` (torch), CoreML compute units (``all``,
            ``cpu``, ``cpu_gpu``, ``cpu_ne``); None: the device the files were compiled for.
        cuda_graphs: capture one CUDA graph per batch size and replay it (torch, TensorRT).
        threads: CPU threads (targets that take a thread count; None: the default, set
            explicitly so that a profile's key says what ran).
        optimization: onnxruntime's graph optimisation level (the onnx target).
        providers: onnxruntime execution providers (the onnx target; None: from the device).
        shared_pool: one onnxruntime thread pool for every session of the process (the onnx
            target; part of the profile key).

    The one type of run options: the runner gives it to its target's :meth:`Target.session_options`,
    which turns it into what that target's ``open`` takes.
    """

    device: str | None = None
    cuda_graphs: bool = False
    threads: int | None = None
    optimization: str = "all"
    providers: tuple[str, ...] | None = None
    shared_pool: bool = False


@dataclass(frozen=True)
class GraphSource:
    """One graph to compile: its names and shapes, and its torch module or ONNX file.

    Args:
        name: ``stageK`` or ``prefixK``.
        inputs, outputs: graph tensor names (docs/bundle.md), in call order.
        input_shapes: per-input shapes without the batch dimension.
        input_dtypes: manifest dtype names of the inputs.
        module: the torch stage module (targets with ``source="module"``).
        example: example inputs for tracing (torch tensors, batch >= 2).
        onnx: path of the stage ONNX file (targets with ``source="onnx"``).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...] = ()
    module: Any = None
    example: tuple[Any, ...] | None = None
    onnx: Path | None = None


@dataclass(frozen=True)
class CompiledFile:
    """A compiled graph: its file (or package) and the facts to record in the manifest's file entry."""

    path: Path
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)


class Target:
    """Base class of a target (subclasses set the class attributes and implement the methods).

    Attributes:
        name: the ``--target`` name and the key of its files in the manifest.
        description: one line for the format table.
        caps: :class:`Capabilities`.
        compile_requires, run_requires: Python modules needed to compile / to run.
        extra: the pip extra that installs them.
        folder: the bundle folder of its files; suffix: their suffix.
    """

    name = ""
    description = ""
    caps = Capabilities(precisions=("fp32",), dynamic_batch=True, can_abort=False, devices=("cpu",), source="onnx")
    compile_requires: tuple[str, ...] = ()
    run_requires: tuple[str, ...] = ()
    extra = ""
    folder = ""
    suffix = ""
    # the open() option that receives the run device (torch: "device"; CoreML: "compute_units");
    # None: the session picks its device itself (TensorRT: the current CUDA device)
    device_option: str | None = None
    # open() options a RunSpec may fill in besides the device ("threads", "cuda_graphs")
    run_options: tuple[str, ...] = ()

    # -- availability --------------------------------------------------------------------------
    @staticmethod
    def _missing(mods: Sequence[str]) -> list[str]:
        out = []
        for m in mods:
            try:
                if importlib.util.find_spec(m) is None:
                    out.append(m)
            except (ImportError, ValueError):
                out.append(m)
        return out

    def missing(self, kind: str = "compile") -> list[str]:
        """Python modules needed for ``kind`` (``compile`` or ``run``) that are not installed."""
        return self._missing(self.compile_requires if kind == "compile" else self.run_requires)

    def can_compile(self) -> bool:
        """The compile half works here."""
        return not self.missing("compile")

    def can_run(self) -> bool:
        """Sessions can be opened and run here (library and device present)."""
        return not self.missing("run")

    def unavailable(self, kind: str, what: str | None = None) -> TargetUnavailable:
        """The error for a missing library: names it and the extra to install."""
        miss = what or ", ".join(self.missing(kind)) or "its runtime"
        return TargetUnavailable(f"target {self.name!r} needs {miss} to {kind}, which is not available here; "
                                 f"install it with: pip install 'kdedge[{self.extra}]'")

    def require(self, kind: str) -> None:
        """Raise :class:`TargetUnavailable` when ``kind`` cannot work here."""
        if self.missing(kind):
            raise self.unavailable(kind)

    def info(self) -> dict[str, Any]:
        """This target's row of the format table (JSON-able)."""
        return {"compile": self.can_compile(), "run": self.can_run(), "description": self.description,
                "folder": self.folder, "suffix": self.suffix, "extra": self.extra, **self.caps.to_dict()}

    # -- requests ------------------------------------------------------------------------------
    def default_device(self) -> str:
        return self.caps.devices[0]

    def check(self, spec: CompileSpec) -> CompileSpec:
        """``spec`` with the device filled in, if this target can honour it; else TargetError."""
        if spec.precision not in PRECISIONS:
            raise TargetError(f"unknown precision {spec.precision!r}; known: {', '.join(PRECISIONS)}")
        if spec.precision not in self.caps.precisions:
            raise TargetError(f"target {self.name!r} does not compile precision {spec.precision!r}; it compiles: "
                              f"{', '.join(self.caps.precisions)}")
        device = spec.device or self.default_device()
        if device not in self.caps.devices:
            raise TargetError(f"target {self.name!r} does not run on device {device!r}; its devices: "
                              f"{', '.join(self.caps.devices)}")
        if self.caps.max_batch is not None and spec.max_batch > self.caps.max_batch:
            raise TargetError(f"target {self.name!r} compiles batches up to {self.caps.max_batch}, "
                              f"asked for {spec.max_batch}; lower --max-batch")
        return spec.with_device(device)

    # -- the two halves ------------------------------------------------------------------------
    def compile(self, graphs: Sequence[GraphSource], spec: CompileSpec, out_dir: Path) -> dict[str, CompiledFile]:
        """Compile every graph into ``out_dir``; returns each graph's file. Default: one file per graph."""
        spec = self.check(spec)
        self.require("compile")
        out_dir.mkdir(parents=True, exist_ok=True)
        return {g.name: self.compile_graph(g, spec, out_dir) for g in graphs}

    def compile_graph(self, graph: GraphSource, spec: CompileSpec, out_dir: Path) -> CompiledFile:
        """Compile one graph to ``out_dir / (graph.name + suffix)``."""
        raise NotImplementedError

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> Any:
        """A session (:class:`kdedge.targets.session.Session`) for one compiled graph."""
        raise NotImplementedError

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> Any:
        """The runner's session factory: ``open`` on a bundle's stage entry (options: a dict or None)."""
        opts = dict(options or {}) if not hasattr(options, "__dataclass_fields__") else {"options": options}
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)

    def open_stages(self, bundle: Any, entries: Sequence[Any], options_for: Callable[[str], Any]) -> list[Any]:
        """The runner's sessions for a bundle's chain of stages (``options_for(name)``: each
        graph's options). A target may open the stages together to link them (the ``onnx``
        target keeps carried tensors in onnxruntime's blocked layout); by default each stage is
        :meth:`open_entry` on its own. Sessions opened before a failure are closed."""
        sessions: list[Any] = []
        try:
            for e in entries:
                sessions.append(self.open_entry(bundle, e, options_for(e.name)))
        except BaseException:
            for s in sessions:
                s.close()
            raise
        return sessions

    # -- running -------------------------------------------------------------------------------
    def run_device(self, run: RunSpec, bundle: Any = None) -> str:
        """The device sessions run on: ``run.device``, else the device the bundle's files were
        compiled for (their manifest entries record it), else the target's first device."""
        if run.device:
            return run.device
        if bundle is not None:
            for e in getattr(bundle, "stages", ())[:1]:
                f = e.files.get(self.name)
                dev = None if f is None else f.extra.get("device")
                if isinstance(dev, str) and dev.split(":", 1)[0] in self.caps.devices:
                    return dev
        return self.default_device()

    def session_options(self, run: RunSpec, bundle: Any = None) -> dict[str, Any]:
        """The ``open_entry`` options for ``run``; a request this target cannot honour raises
        :class:`TargetError` (never rewritten: ``--cuda-graphs`` on a CPU run fails)."""
        device = self.run_device(run, bundle)
        kind = device.split(":", 1)[0]
        if run.shared_pool:  # the onnx target handles it before these checks
            raise TargetError(f"--shared-pool shares onnxruntime's thread pool; the {self.name} target has none")
        if kind not in self.caps.devices:
            raise TargetError(f"target {self.name!r} does not run on device {device!r}; its devices: "
                              f"{', '.join(self.caps.devices)}")
        if kind != device and self.device_option != "device":
            raise TargetError(f"target {self.name!r} runs on the current {kind} device and takes no device index; "
                              f"pass --device {kind} (choose the GPU with CUDA_VISIBLE_DEVICES)")
        if run.cuda_graphs:
            if not self.caps.cuda_graphs:
                raise TargetError(f"target {self.name!r} does not use CUDA graphs; drop --cuda-graphs, or run the "
                                  "bundle's torch or tensorrt files")
            if kind != "cuda":
                raise TargetError(f"CUDA graphs need a CUDA device, not {device!r}; pass --device cuda or drop "
                                  "--cuda-graphs")
        opts: dict[str, Any] = {}
        if self.device_option is not None:
            opts[self.device_option] = device
        if run.cuda_graphs:
            opts["cuda_graphs"] = True
        if "threads" in self.run_options:
            from kdedge.targets.threads import default_threads

            opts["threads"] = int(run.threads) if run.threads is not None else default_threads()
        return opts

    def options_key(self, options: Any, bundle: Any = None) -> str:
        """The run key (:meth:`run_key`) of session options given explicitly (``Runner(session_options=)``):
        read from the device and CUDA-graph options they hold."""
        d = dict(options) if isinstance(options, dict) else {}
        dev = d.get(self.device_option) if self.device_option else None
        return self.run_key(RunSpec(device=dev, cuda_graphs=bool(d.get("cuda_graphs"))), bundle)

    def options_threads(self, options: Any) -> int | None:
        """The CPU threads per session that ``options`` (from :meth:`session_options`) set, if any."""
        return options.get("threads") if isinstance(options, dict) else None

    def run_key(self, run: RunSpec, bundle: Any = None) -> str:
        """What a latency profile of these sessions is keyed by besides the device and setting:
        target, run device and CUDA graphs (``torch-cuda-cudagraphs``)."""
        device = self.run_device(run, bundle).replace(":", "")
        return f"{self.name}-{device}" + ("-cudagraphs" if run.cuda_graphs else "")

    def verify_options(self, spec: CompileSpec) -> dict[str, Any]:
        """Session options for verifying freshly compiled files here (default: none). A target
        whose files can run on several devices verifies on the one they were compiled for when
        this machine has it."""
        return {}

    def verify_here(self) -> bool:
        """Compiled files can be run here to verify them against onnxruntime."""
        return self.can_run()
