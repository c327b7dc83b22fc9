"""Adding a target's files to a bundle: at export time (``kdedge export --target NAME``) from
the stage modules, or later on the device (``kdedge build BUNDLE --target tensorrt``) from the
bundle's ONNX files.

The bundle always holds the ONNX files (the reference); each further target adds its folder, a
file entry per stage and prefix (``files[NAME]``, with the target's facts: precision, device,
versions, what verified it) and its name in ``targets``. Compiled files that can run here are
verified against onnxruntime on the same inputs, chained the way the runner chains them;
files that cannot run here get the target's static checks (CoreML: the package's functions,
inputs, outputs and ops against the manifest), and the entry says which was done
(``verified``: ``"onnxruntime"`` or ``"static"``).

``build_bundle`` rewrites the bundle atomically (a new directory swapped in place), so an
interrupted build leaves the old bundle as it was.

INT8 engines from an FP32 bundle (TensorRT 10) are calibrated on real images:
``spec.options["calibration"]`` is a :class:`kdedge.targets.calibration.CalibrationSet` made
from this bundle; the build verifies on its first images (not random ones, which an INT8
engine's calibrated ranges do not cover) and records what calibrated it in each file entry
(``calibration``) and in ``provenance.targets``. :func:`preflight` refuses a request (calibration
that nothing would use included) before any image is read.

A ``--precision int8`` bundle whose export kept some graphs FP32 (its INT8 accuracy gate,
``quantization.fp32_graphs``) is built at int8 for its QDQ graphs and at fp32 for the kept ones
(one progress line names them); each file entry records its graph's precision, and the report
(``provenance.targets[NAME]``) lists them under ``fp32_graphs``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdedge.bundle.chain import chain
from kdedge.bundle.manifest import Bundle, StageEntry
from kdedge.bundle.validate import validate_manifest
from kdedge.targets import get_target, open_bundle
from kdedge.targets.base import CompiledFile, CompileSpec, GraphSource, Target, TargetError

Progress = Callable[[str], None]

# the parity check of a compiled target against onnxruntime: |a - b| <= atol + rtol * |b|
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "int8": (1e-1, 1e-1)}


def sources_from_bundle(bundle: Any) -> list[GraphSource]:
    """The graphs of an opened bundle, compiled from its ONNX files (no torch needed)."""
    out = []
    for e in (*bundle.stages, *bundle.prefixes):
        out.append(GraphSource(name=e.name, inputs=tuple(i.tensor for i in e.inputs),
                               outputs=tuple(o.tensor for o in e.outputs),
                               input_shapes=tuple(tuple(int(d) for d in i.shape[1:]) for i in e.inputs),
                               input_dtypes=tuple(i.dtype for i in e.inputs), onnx=bundle.file(e, "onnx")))
    return out


def host_array(v: Any) -> np.ndarray:
    """A session output on the host: numpy as it is, a torch tensor (any device) as float32, a
    TensorRT :class:`~kdedge.targets.tensorrt.DeviceTensor` (or anything with ``__array__``) copied."""
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # torch, without importing it
        return v.detach().float().cpu().numpy()
    return np.asarray(v)


def _chain(sessions: Sequence[Any], entries: Sequence[StageEntry], x: np.ndarray) -> dict[str, np.ndarray]:
    """Run stages in order on ``x`` (each reading what earlier ones produced); every output as numpy.
    Carried outputs are passed on as the sessions returned them (device tensors stay on the device)."""
    outs = chain([[i.tensor for i in e.inputs] for e in entries], lambda k, feeds: sessions[k].run(feeds), x,
                 names=[e.name for e in entries])
    return {k: host_array(v) for out in outs for k, v in out.items()}


def compare(target: str, precision: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-output max abs error and the worst ``|a-b| / (atol + rtol|b|)``; ``passed`` when every ratio <= 1."""
    atol, rtol = TOLERANCES[precision]
    rows = {}
    for k, b in ref.items():
        a = np.asarray(got[k], np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise TargetError(f"{target}: output {k} has shape {a.shape}, onnxruntime gives {b.shape}")
        err = np.abs(a - b)
        rows[k] = {"max_abs": float(err.max()) if err.size else 0.0,
                   "worst_ratio": float((err / (atol + rtol * np.abs(b))).max()) if err.size else 0.0}
    worst = max((r["worst_ratio"] for r in rows.values()), default=0.0)
    return {"atol": atol, "rtol": rtol, "outputs": rows, "worst_ratio": worst, "passed": bool(worst <= 1.0)}


def kept_fp32(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The graphs a ``--precision int8`` export kept FP32 (its INT8 accuracy gate with
    ``keep_fp32``; ``quantization.fp32_graphs``); empty for an FP32 bundle."""
    return tuple((manifest.get("quantization") or {}).get("fp32_graphs") or ())


def verify_against_onnx(root: Path, manifest: dict[str, Any], target: Target, x: np.ndarray,
                        open_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the target's stages (chained) and each prefix, and the ONNX ones, on ``x``; compare."""
    from kdedge.bundle.manifest import Bundle

    bundle = Bundle(path=root, manifest=manifest,
                    stages=tuple(StageEntry.from_dict(s, k) for k, s in enumerate(manifest["stages"])),
                    prefixes=tuple(StageEntry.from_dict(s, k) for k, s in enumerate(manifest["prefixes"])))
    onnx = get_target("onnx")
    report: dict[str, Any] = {}
    for group in (bundle.stages, *[(p,) for p in bundle.prefixes]):
        if not group:
            continue
        ref_s = [onnx.open_entry(bundle, e, None) for e in group]
        tgt_s = [target.open_entry(bundle, e, open_options) for e in group]
        try:
            ref = _chain(ref_s, group, x)
            got = _chain(tgt_s, group, x)
        finally:
            for s in (*ref_s, *tgt_s):
                s.close()
        precision = max((e.files[target.name].precision for e in group), key=("fp32", "fp16", "int8").index)
        report[group[0].name if len(group) == 1 else "stages"] = compare(target.name, precision, ref, got)
    return report


def add_target(root: Path, manifest: dict[str, Any], target_name: str, spec: CompileSpec,
               sources: Sequence[GraphSource], verify_x: np.ndarray | None = None,
               progress: Progress | None = None, open_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``sources`` for a target into ``root/<folder>`` and record them in ``manifest`` (in place).

    Args:
        root: the bundle directory being written (its ONNX files already there).
        manifest: the manifest dict; gains ``files[target]`` per graph and the target in ``targets``.
        target_name: the target.
        spec: what to compile (checked by the target first).
        sources: one per stage and prefix, names matching the manifest.
        verify_x: model inputs to verify on (when the target runs here).
        open_options: session options for the verification run.

    Returns:
        the verification report (``{"verified": "onnxruntime" | "static", ...}``).

    Raises:
        TargetError: a request the target cannot honour, a missing library, a failed compile or
            a failed verification.
    """
    say = progress or (lambda _m: None)
    target = get_target(target_name)
    spec = target.check(spec)
    target.require("compile")
    if target_name in manifest["targets"]:
        raise TargetError(f"the bundle already holds {target_name!r} files; build into a copy, or re-export")
    graphs = {g["name"]: g for g in (*manifest["stages"], *manifest["prefixes"])}
    if sorted(graphs) != sorted(s.name for s in sources):
        raise TargetError(f"graphs to compile {sorted(s.name for s in sources)} differ from the manifest's {sorted(graphs)}")
    out_dir = root / target.folder
    if out_dir.exists():
        raise TargetError(f"{out_dir} already exists in the bundle; remove it or re-export")
    kept = kept_fp32(manifest) if spec.precision == "int8" and target.caps.source == "onnx" else ()
    say(f"compile {len(sources)} graphs for {target_name} ({spec.precision}, {spec.device})")
    if kept:  # the export's accuracy gate decided: an int8 build does not override it
        say(f"build {', '.join(kept)} at fp32: the export's INT8 accuracy gate kept them FP32")
        spec = replace(spec, options={**spec.options, "fp32_graphs": kept})
    files: dict[str, CompiledFile] = target.compile(sources, spec, out_dir)
    from kdedge.bundle.writer import file_entry

    digests: dict[str, dict[str, Any]] = {}  # a package shared by several graphs is hashed once
    for name, cf in files.items():
        rel = cf.path.relative_to(root).as_posix()
        if rel not in digests:
            digests[rel] = file_entry(root, rel)
        graphs[name]["files"][target_name] = {**digests[rel], "precision": cf.precision, **cf.extra}
    manifest["targets"] = [*manifest["targets"], target_name]
    report: dict[str, Any]
    check_static = getattr(target, "check_compiled", None)
    if verify_x is not None and target.verify_here():
        verify_x = verify_x[: spec.max_batch]  # one call per graph: stay within the compiled batch range
        if open_options is None:
            open_options = target.verify_options(spec)
        say(f"verify {target_name} against onnxruntime on {len(verify_x)} images"
            + (f" ({', '.join(f'{k} {v}' for k, v in open_options.items())})" if open_options else ""))
        report = {"verified": "onnxruntime", "n": int(len(verify_x)),
                  "options": {k: v for k, v in open_options.items() if isinstance(v, (str, int, float, bool))},
                  "graphs": verify_against_onnx(root, manifest, target, verify_x, open_options)}
        bad = [k for k, r in report["graphs"].items() if not r["passed"]]
        if bad:
            worst = max(report["graphs"][k]["worst_ratio"] for k in bad)
            raise TargetError(f"{target_name} files differ from onnxruntime beyond tolerance in {', '.join(bad)} "
                              f"(worst ratio {worst:.3g}); the target's numerics are off for this model")
    elif check_static is not None:
        say(f"check {target_name} files (cannot run them here)")
        report = {"verified": "static", **check_static(root, manifest)}
    else:
        report = {"verified": "none", "reason": f"{target_name} cannot run here and has no static check"}
    if kept:
        report["fp32_graphs"] = list(kept)
    for name in files:
        graphs[name]["files"][target_name]["verified"] = report["verified"]
    validate_manifest(manifest, where="the manifest with the new target")
    return report


def preflight(bundle: Any, target_name: str, spec: CompileSpec | None = None,
              calibration_batch: int | None = None) -> CompileSpec:
    """Check a ``kdedge build`` request against an opened bundle before any work is done.

    Args:
        bundle: the opened bundle.
        target_name: the target to add.
        spec: the request (None: the defaults).
        calibration_batch: the calibration batch size when calibration images are given.

    Returns:
        the checked spec (device filled in).

    Raises:
        TargetError: a target built from the stage modules, calibration that no graph would use
            or that the target does not take, a precision the installed version cannot build,
            a missing library, or a bundle that already holds the target.
    """
    target = get_target(target_name)
    spec = target.check(spec or CompileSpec())
    if target.caps.source != "onnx":
        raise TargetError(f"target {target_name!r} compiles from the stage modules, not from ONNX; run "
                          f"`kdedge export RUN_DIR --target {target_name}` where the training run is")
    # the ONNX precision of each graph: int8 files are QDQ (docs/bundle.md, quantization)
    qdq = {e.name: e.files["onnx"].precision == "int8" for e in (*bundle.stages, *bundle.prefixes)}
    check = getattr(target, "check_build", None)
    if check is not None:
        check(spec, qdq, calibration_batch, kept_fp32(bundle.manifest))
    elif calibration_batch is not None:
        raise TargetError(f"target {target_name!r} takes no calibration images (tensorrt does, for int8 from an "
                          "FP32 bundle); drop --calib/--calib-data")
    target.require("compile")
    if target_name in bundle.targets:
        raise TargetError(f"bundle {bundle.path} already holds {target_name!r} files; re-export it to rebuild them")
    return spec


def build_bundle(path: str | Path | Bundle, target_name: str, spec: CompileSpec | None = None,
                 progress: Progress | None = None, verify_n: int = 4, seed: int = 0,
                 open_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile a bundle's ONNX files for an add-on target (TensorRT on the device) and add them.

    The bundle is opened (checksums verified; or given already opened), copied into a temporary sibling directory, the
    target's files are compiled and verified there (against onnxruntime on ``verify_n`` inputs
    when both run here: the first calibration images when ``spec.options["calibration"]`` is
    set, else seeded random ones), and the new bundle replaces the old one atomically.

    Returns:
        the verification report, with ``calibration`` (what calibrated the build, or None); it
        is also recorded under ``provenance.targets[target_name]``.

    Raises:
        TargetError: the target cannot be built from ONNX, or the request / build fails.
        BundleError: the bundle is unusable.
    """
    from kdedge.bundle.writer import BundleDir

    say = progress or (lambda _m: None)
    bundle = path if isinstance(path, Bundle) else open_bundle(path, targets=["onnx"])
    calib = (spec.options.get("calibration") if spec is not None else None)
    if calib is not None:
        calib.check_bundle(bundle)
    spec = preflight(bundle, target_name, spec, None if calib is None else int(calib.batch_size))
    manifest = {**bundle.manifest, "stages": [dict(s, files=dict(s["files"])) for s in bundle.manifest["stages"]],
                "prefixes": [dict(s, files=dict(s["files"])) for s in bundle.manifest["prefixes"]]}
    x = None
    if verify_n > 0 and calib is not None:
        x = calib.images[:verify_n]
    elif verify_n > 0:
        shape = [int(d) for d in bundle.input_shape[1:]]
        x = np.random.default_rng(seed).standard_normal((verify_n, *shape)).astype(np.float32)
    try:
        with BundleDir(bundle.path, force=True) as bd:
            for item in bundle.path.iterdir():
                if item.name == "manifest.json":
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, bd.tmp / item.name)
            # compile from the copies, so the sources are the files that are committed
            sources = [GraphSource(**{**s.__dict__, "onnx": bd.tmp / Path(s.onnx).relative_to(bundle.path)})
                       for s in sources_from_bundle(bundle)]
            report = add_target(bd.tmp, manifest, target_name, spec, sources, verify_x=x, progress=say,
                                open_options=open_options)
            if report["verified"] == "onnxruntime":
                report["verify_inputs"] = "calibration images" if calib is not None else f"random (seed {seed})"
            report["calibration"] = None if calib is None else calib.record()
            prov = dict(manifest["provenance"])
            prov["targets"] = {**prov.get("targets", {}), target_name: report}
            manifest["provenance"] = prov
            bd.commit(manifest)
    finally:
        if calib is not None:
            calib.close()
    return report
