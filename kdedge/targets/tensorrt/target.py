"""The ``tensorrt`` target: builds one engine per graph, opens :class:`TensorRTSession` s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from kdedge.targets.base import Capabilities, CompiledFile, CompileSpec, GraphSource, Target, TargetError
from kdedge.targets.tensorrt.calibrator import _calibrator
from kdedge.io import atomic_write_bytes
from kdedge.targets.tensorrt.engine import device_facts, timing_cache_path, write_engine
from kdedge.targets.tensorrt.plan import (calibration_cache_path, check_calibration, graph_precisions, onnx_is_qdq,
                                          precision_plan, profile_shapes, trt_major)
from kdedge.targets.tensorrt.session import TensorRTSession


class TensorRTTarget(Target):
    """Engines per stage and prefix, built from the stage ONNX on the device."""

    name = "tensorrt"
    description = "TensorRT engines (10 or 11) per stage and prefix, built from the stage ONNX on the device"
    caps = Capabilities(precisions=("fp32", "fp16", "int8"), dynamic_batch=True, can_abort=False, devices=("cuda",),
                        source="onnx", cuda_graphs=True)
    device_option = None  # sessions run on the current CUDA device (CUDA_VISIBLE_DEVICES picks it)
    run_options = ("cuda_graphs",)
    compile_requires = ("tensorrt", "onnx")
    run_requires = ("tensorrt",)
    extra = "tensorrt"
    folder = "tensorrt"
    suffix = ".plan"
    calibrates = True  # takes spec.options["calibration"] (TensorRT 10, INT8 from an FP32 ONNX)

    def check_build(self, spec: CompileSpec, qdq: Mapping[str, bool], calibration_batch: int | None,
                    kept: Collection[str] = ()) -> None:
        """Refuse a build request before any work: calibration where it has no use, a calibration
        batch outside the batch range and, when TensorRT is installed, a precision its version
        cannot build (:func:`precision_plan`, per graph, at :func:`graph_precisions`).

        Args:
            spec: the checked request.
            qdq: graph name -> its ONNX is QDQ.
            calibration_batch: the calibration batch size, None without calibration.
            kept: the graphs the export's INT8 gate kept FP32 (an int8 build builds them FP32).
        """
        check_calibration(spec.precision, qdq, calibration_batch is not None, kept)
        if calibration_batch is not None and not spec.min_batch <= calibration_batch <= spec.max_batch:
            raise TargetError(f"the calibration batch {calibration_batch} is outside the engine's batch range "
                              f"{spec.min_batch}..{spec.max_batch}; pass --calib-batch within it")
        if self.can_compile():
            import tensorrt as trt

            major = trt_major(trt.__version__)
            for g, precision in graph_precisions(spec.precision, qdq, kept).items():
                precision_plan(major, precision, qdq[g], have_calibration=calibration_batch is not None)

    def compile(self, graphs: Sequence[GraphSource], spec: CompileSpec, out_dir: Path) -> dict[str, CompiledFile]:
        """One engine per graph; options: ``calibration`` (a
        :class:`~kdedge.targets.calibration.CalibrationSet`), ``timing_cache_dir`` (also where
        calibration caches go), ``workspace_mb``, ``fp32_graphs`` (the graphs the export's INT8
        gate kept FP32: an int8 build builds them FP32, :func:`graph_precisions`; ``kdedge
        build`` passes the bundle's ``quantization.fp32_graphs``). Each file's precision is its
        graph's."""
        spec = self.check(spec)
        self.require("compile")
        import tensorrt as trt

        major = trt_major(trt.__version__)
        calib = spec.options.get("calibration")
        kept = tuple(spec.options.get("fp32_graphs", ()))
        qdq = {g.name: onnx_is_qdq(Path(g.onnx)) for g in graphs if g.onnx is not None}
        self.check_build(spec, qdq, None if calib is None else int(calib.batch_size), kept)
        precisions = graph_precisions(spec.precision, qdq, kept)
        here = device_facts()
        out_dir.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(spec.options.get("timing_cache_dir", Path.home() / ".cache" / "kdedge" / "tensorrt"))
        cache_path = timing_cache_path(cache_dir, here)
        out = {}
        for g in graphs:
            out[g.name] = self._build(trt, major, here, g, spec, out_dir, cache_path, qdq.get(g.name, False),
                                      precisions.get(g.name, spec.precision))
        return out

    def _build(self, trt: Any, major: int, here: Mapping[str, Any], g: GraphSource, spec: CompileSpec,
               out_dir: Path, cache_path: Path, is_qdq: bool, precision: str) -> CompiledFile:
        if g.onnx is None:
            raise TargetError(f"{g.name}: the tensorrt target builds from the stage ONNX file, none was given")
        calib = spec.options.get("calibration")
        plan = precision_plan(major, precision, is_qdq, have_calibration=calib is not None)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if plan["strongly_typed"]:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(g.onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TargetError(f"TensorRT cannot parse {g.name}'s ONNX (an op or shape it does not support): {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.options.get("workspace_mb", 1024)) << 20)
        for f in plan["flags"]:
            config.set_flag(getattr(trt.BuilderFlag, f))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(list(zip(g.inputs, g.input_shapes)), spec.min_batch,
                                                  spec.opt_batch, spec.max_batch).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        calibrator = None
        record = None
        if plan["calibrator"]:
            batches = calib.for_graph(g.name)
            if tuple(batches.inputs) != tuple(g.inputs):
                raise TargetError(f"{g.name}: the calibration batches hold {list(batches.inputs)}, the graph reads "
                                  f"{list(g.inputs)}; make the calibration set from this bundle")
            from kdedge.bundle.files import sha256_path

            cal_file = calibration_cache_path(cache_path.parent, g.name, sha256_path(g.onnx), batches.digest,
                                              str(trt.__version__))
            calibrator = _calibrator(trt, batches, cal_file)
            config.int8_calibrator = calibrator
            # a profile of exactly the calibration batch: with dynamic shapes TensorRT calibrates at
            # the calibration profile's OPT shape, which must be the batches' shape
            cal_profile = builder.create_optimization_profile()
            for name, shape in zip(g.inputs, g.input_shapes):
                full = (batches.batch_size, *shape)
                cal_profile.set_shape(name, full, full, full)
            config.set_calibration_profile(cal_profile)
            record = {**calib.record(), "graph_digest": batches.digest, "cache": cal_file.name}
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        try:
            engine = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()
        if calibrator is not None and calibrator.error is not None:
            raise calibrator.error  # raised inside a TensorRT callback, which cannot carry it
        if engine is None:
            raise TargetError(f"TensorRT could not build an engine for {g.name} ({precision}); see the "
                              "TensorRT log above")
        if record is not None:
            record.update(batches_fed=calibrator.fed, cache_reused=calibrator.cache_reused)
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        meta = {**here, "name": g.name, "inputs": list(g.inputs), "outputs": list(g.outputs),
                "precision": precision, "batch_range": [spec.min_batch, spec.max_batch],
                "opt_batch": spec.opt_batch, "strongly_typed": plan["strongly_typed"], "flags": plan["flags"],
                "calibration": None if record is None else record["digest"]}
        dest = out_dir / f"{g.name}{self.suffix}"
        write_engine(dest, meta, bytes(memoryview(engine)))
        extra = {k: meta[k] for k in ("tensorrt", "cuda", "gpu", "compute_capability", "jetson_l4t", "batch_range",
                                      "strongly_typed")}
        if record is not None:
            extra["calibration"] = record
        return CompiledFile(dest, precision, extra)

    def open(self, path: str | Path, *, name: str, inputs: Sequence[str], outputs: Sequence[str],
             **options: Any) -> TensorRTSession:
        """A :class:`TensorRTSession`; options ``host_outputs``, ``cuda_graphs``."""
        self.require("run")
        unknown = set(options) - {"host_outputs", "cuda_graphs", "facts"}
        if unknown:
            raise TargetError(f"unknown tensorrt session option(s) {sorted(unknown)}; known: host_outputs, cuda_graphs")
        return TensorRTSession(path, name=name, inputs=inputs, outputs=outputs, **options)

    def open_entry(self, bundle: Any, entry: Any, options: Any = None) -> TensorRTSession:
        opts = dict(options or {})
        opts.setdefault("host_outputs", (entry.logits_tensor,))
        return self.open(bundle.file(entry, self.name), name=entry.name, inputs=[i.tensor for i in entry.inputs],
                         outputs=[o.tensor for o in entry.outputs], **opts)
