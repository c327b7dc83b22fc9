"""``export``: a trained model to a verified bundle; ``export_run``: the same from a run directory.

Steps: check the request against the target table; take ``model.deploy()`` when the family
has it; list the stage (and fused prefix) graphs from the stage contract; export each graph to
ONNX; verify the chain against torch on validation images (fail with the table); for INT8,
quantize and gate accuracy; write the manifest and the report; move the bundle into place
atomically.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdedge.export import manifest as mf
from kdedge.export.data import Batches
from kdedge.export.errors import ExportError
from kdedge.export.graphs import Graph, ModelPlan, graph_example_inputs, plan_model, run_torch, shapes_of
from kdedge.export.onnx import EXPORTERS, check_opset, dtype_name, export_graph
from kdedge.export.ortrun import OrtChain, RunGraph
from kdedge.export.verify import Tolerances, check, summary, verify

Progress = Callable[[str], None]
_INFO_KEYS = ("num_classes", "in_channels", "input_size", "mean", "std", "scale", "channel_order", "class_names")

# what writing and checking the ONNX reference needs, whatever the target
EXPORT_REQUIRES = ("torch", "onnx", "onnxscript", "onnxruntime")


def normalise_info(info: Any) -> dict[str, Any]:
    """A :class:`~kdedge.train.data.DatasetInfo` or an equivalent dict, as a plain dict."""
    d = info.to_dict() if hasattr(info, "to_dict") else dict(info) if isinstance(info, dict) else None
    if d is None:
        raise ExportError(f"info must be a DatasetInfo or a dict, got {type(info).__name__}")
    missing = [k for k in _INFO_KEYS if k not in d]
    if missing:
        raise ExportError(f"dataset info lacks {missing}; pass kdedge.train.data.DatasetInfo or a dict with {_INFO_KEYS}")
    size = [int(v) for v in (d["input_size"] if not isinstance(d["input_size"], int) else [d["input_size"]] * 2)]
    c = int(d["in_channels"])
    out = {
        "dataset": str(d.get("name", "unknown")),
        "num_classes": int(d["num_classes"]),
        "in_channels": c,
        "input_size": size,
        "resize": None if d.get("resize") is None else int(d["resize"]),
        "scale": float(d["scale"]),
        "mean": [float(v) for v in d["mean"]],
        "std": [float(v) for v in d["std"]],
        "channel_order": str(d["channel_order"]),
        "class_names": [str(v) for v in d["class_names"]],
    }
    if len(size) != 2 or len(out["mean"]) != c or len(out["std"]) != c or len(out["class_names"]) != out["num_classes"]:
        raise ExportError(f"dataset info is inconsistent: input_size {size}, {c} channels, {len(out['mean'])} means, "
                          f"{len(out['std'])} stds, {len(out['class_names'])} names for {out['num_classes']} classes")
    return out


def _graph_entry(g: Graph, tmp: Path, rel: str, precision: str, meta: dict[str, Any], ins: list[list[int | None]],
                 in_dtypes: list[str], outs: list[list[int | None]], out_dtypes: list[str], macs: int, params: int,
                 accuracy: dict[str, float]) -> dict[str, Any]:
    return {
        "name": g.name,
        "files": {"onnx": mf.file_entry(tmp, rel, precision=precision, **meta)},
        "inputs": [{"binding": b, "tensor": t, "shape": s, "dtype": d}
                   for b, t, s, d in zip(g.spec.inputs, g.inputs, ins, in_dtypes)],
        "outputs": [{"name": o, "tensor": t, "shape": s, "dtype": d}
                    for o, t, s, d in zip(g.spec.outputs, g.outputs, outs, out_dtypes)],
        "logits": g.spec.logits,
        "members": g.spec.members,
        "members_total": g.members_total,
        "macs": int(macs),
        "params": int(params),
        "accuracy": accuracy,
        "last_stage": g.last_stage,
    }


def _costs(plan: ModelPlan, shape: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    from kdedge.models.flops import count_cost, stage_costs

    costs = {g.name: (c.macs, c.params) for g, c in zip(plan.stages, stage_costs([g.module for g in plan.stages], shape))}
    for g in plan.prefixes:
        c = count_cost(g.module, torch.zeros(1, *shape))
        costs[g.name] = (c.macs, c.params)
    return costs


def export(model: nn.Module, out: str | Path, *, info: Any, val_data: Any, calib_data: Any = None,
           target: str = "onnx", precision: str = "fp32", opset: int = 18, simplify: bool = False,
           int8_max_drop: float = 1.0, int8_keep_fp32: bool = False, provenance: dict[str, Any] | None = None,
           force: bool = False, progress: Progress | None = None, atol: float = 1e-4, rtol: float = 1e-3,
           min_top1_agreement: float = 0.99, exporter: str = "auto", batch_size: int = 64,
           calib_size: int | None = None, int8_scheme: str = "u8s7", device: str | None = None,
           max_batch: int = 64, target_options: dict[str, Any] | None = None) -> Path:
    """Export a trained model to a verified bundle directory.

    Args:
        model: an anytime model (``stages()``, ``combine_rules``; ``deploy()`` is applied when
            present) or a plain classifier (one stage).
        out: the bundle directory to create.
        info: :class:`~kdedge.train.data.DatasetInfo` (or its ``to_dict()``): classes and
            preprocessing.
        val_data: validation images for verification and the manifest's accuracies: ``(x, y)``
            arrays/tensors (x normalised, [N, C, H, W]), a Dataset or a DataLoader.
        calib_data: INT8 only: calibration images (training images), same forms; labels unused.
        target: export target (``kdedge.targets.TARGETS``): ``onnx``, or a target whose files
            are added beside the ONNX reference (``torch``, ``coreml``, ``tensorrt``) and verified
            against it (docs/targets.md).
        precision: ``fp32``, ``fp16`` (targets other than onnx; the ONNX reference stays fp32)
            or ``int8``.
        opset: ONNX opset.
        simplify: simplify graphs with onnxsim.
        int8_max_drop: INT8 gate, in accuracy points per stage and rule.
        int8_keep_fp32: keep FP32 for a stage that fails the INT8 gate instead of failing.
        provenance: extra provenance: ``run_dir`` and ``config`` (the run's config dict) are
            recorded in their fields, anything else as is.
        force: replace an existing bundle at ``out`` (atomically).
        progress: called with a short message at each step.
        atol, rtol, min_top1_agreement: verification tolerances (``|a-b| <= atol + rtol*|b|``).
        exporter: ``auto`` (dynamo, legacy fallback), ``dynamo`` or ``legacy``.
        batch_size: batch size for verification when ``val_data`` is arrays or a Dataset.
        calib_size: use at most this many calibration images (None: all of ``calib_data``).
        int8_scheme: ``u8s7`` (uint8 asymmetric activations, 7-bit weights: exact on every CPU),
            ``s8s7`` (int8 symmetric activations, as TensorRT reads QDQ graphs), or ``u8s8`` /
            ``s8s8`` with full 8-bit weights, which saturate in onnxruntime's kernels on x86 CPUs
            without VNNI (``kdedge.export.quantize``).
        device, max_batch, target_options: the target's compile spec
            (:class:`kdedge.targets.CompileSpec`); ignored for ``onnx``.

    Returns:
        the bundle path.

    Raises:
        ExportError: bad request, contract violation, failed verification or INT8 gate (the
            message carries the table; ``.report`` the report).

    Example:
        >>> export(model, "model.kdedge", info=splits.info, val_data=splits.val)
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        return _export(model, Path(out), info=info, val_data=val_data, calib_data=calib_data, target=target,
                       precision=precision, opset=opset, simplify=simplify, int8_max_drop=int8_max_drop,
                       int8_keep_fp32=int8_keep_fp32, provenance=provenance, force=force, progress=progress,
                       tol=(atol, rtol, min_top1_agreement), exporter=exporter, batch_size=batch_size,
                       calib_size=calib_size, int8_scheme=int8_scheme,
                       tspec=(device, max_batch, dict(target_options or {})))
    finally:  # export runs in eval mode; give the caller's model back as it was
        for m, was in flags:
            m.training = was


def _export(model: nn.Module, out: Path, *, info: Any, val_data: Any, calib_data: Any, target: str, precision: str,
            opset: int, simplify: bool, int8_max_drop: float, int8_keep_fp32: bool,
            provenance: dict[str, Any] | None, force: bool, progress: Progress | None,
            tol: tuple[float, float, float], exporter: str, batch_size: int, calib_size: int | None,
            int8_scheme: str = "u8s7", tspec: tuple[str | None, int, dict[str, Any]] = (None, 64, {})) -> Path:
    say: Progress = progress or (lambda _m: None)
    compile_spec = None
    from kdedge.targets import TARGETS, TEST_TARGETS, CompileSpec, Target, TargetError, get_target

    missing = Target._missing(EXPORT_REQUIRES)
    if missing:  # the ONNX reference is written for every target
        raise ExportError(f"export needs {', '.join(missing)}, which is not installed; install it with: "
                          "pip install 'kdedge[train]'")
    if target not in TARGETS and target not in TEST_TARGETS:
        from kdedge.models import suggest

        raise ExportError(f"unknown export target {target!r}; {suggest(target, TARGETS)}")
    try:
        tgt = get_target(target)
        if target == "onnx":
            tgt.check(CompileSpec(precision=precision))
        else:  # a further target: checked now, compiled beside the ONNX reference
            compile_spec = tgt.check(CompileSpec(precision=precision, device=tspec[0], max_batch=tspec[1],
                                                 opt_batch=min(tspec[1], 1), options=tspec[2]))
            tgt.require("compile")
    except TargetError as e:
        raise ExportError(str(e)) from None
    if compile_spec is not None:
        precision = "int8" if precision == "int8" else "fp32"  # the ONNX reference's precision
    spec = get_target("onnx")  # the reference: folder, suffix, name
    check_opset(opset)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    if not (isinstance(int8_max_drop, (int, float)) and math.isfinite(int8_max_drop) and int8_max_drop >= 0):
        raise ExportError(f"int8_max_drop must be a number of points >= 0, got {int8_max_drop!r}")
    from kdedge.export.quantize import check_scheme, describe, weight_bits, why

    check_scheme(int8_scheme)
    tolerances = Tolerances(*tol)
    prov = dict(provenance or {})
    if out.absolute().parent.is_dir():
        mf.recover(out.absolute())
    mf.check_destination(out.absolute(), force)
    inf = normalise_info(info)
    try:
        val = Batches(val_data, batch_size)
        ex = val.first(2)
    except ExportError:
        raise
    except ValueError as e:
        raise ExportError(f"validation data: {e}") from None
    calib = None
    if precision == "int8":
        if calib_data is None:
            raise ExportError("precision int8 needs calibration images: pass calib_data (a few hundred training images)")
        try:
            calib = Batches(calib_data, batch_size, limit=calib_size, keep_unlabelled=True)
            calib.first(1)
        except ValueError as e:
            raise ExportError(f"calibration data: {e}") from None

    plan = plan_model(model)
    shape = (inf["in_channels"], *inf["input_size"])
    if tuple(ex.shape[1:]) != tuple(shape):
        raise ExportError(f"validation images are {tuple(ex.shape[1:])}, the dataset info says {shape} (C, H, W)")
    if len(ex) == 1:
        ex = np.concatenate([ex, ex])  # batch 2: keeps exporters from specialising on batch 1
    x_ex = torch.from_numpy(ex)
    examples = graph_example_inputs(plan, x_ex)
    t_stage, t_prefix = run_torch(plan, x_ex)
    for g, o in zip(plan.graphs, [*t_stage, *t_prefix]):
        lg = o[g.logits_tensor]
        if lg.dim() != 2 or lg.shape[1] != inf["num_classes"]:
            raise ExportError(f"{g.name} logits have shape {tuple(lg.shape)}, expected [N, {inf['num_classes']}]")
    costs = _costs(plan, shape)

    with mf.BundleDir(out, force) as bd:
        work = bd.tmp / "_work"
        work.mkdir()
        meta: dict[str, dict[str, Any]] = {}
        for i, g in enumerate(plan.graphs):
            say(f"export {g.name} ({i + 1}/{len(plan.graphs)})")
            meta[g.name] = export_graph(g.module, examples[g.name], work / f"{g.name}.onnx", inputs=g.inputs,
                                        outputs=g.outputs, opset=opset, exporter=exporter, simplify=simplify)

        def run_graph(g: Graph, path: Path) -> RunGraph:
            return RunGraph(g.name, path, tuple(g.inputs), tuple(g.outputs), g.logits_tensor, g.spec.members)

        fp32 = {g.name: run_graph(g, work / f"{g.name}.onnx") for g in plan.graphs}
        stage_chain = OrtChain([fp32[g.name] for g in plan.stages])
        prefix_chain = OrtChain([fp32[g.name] for g in plan.prefixes]) if plan.prefixes else None
        say("verify against torch")
        report = verify(plan, stage_chain, prefix_chain, val, tolerances, target=target)
        check(report)

        rules = list(plan.rules)
        stage_acc = [{r: c["accuracy"] for c in report["combined"] if c["graph"] == g.name for r in [c["rule"]]}
                     for g in plan.stages]
        prefix_acc = [next(c["accuracy"] for c in report["combined"] if c["graph"] == g.name) for g in plan.prefixes]
        chosen = fp32
        precisions = {g.name: "fp32" for g in plan.graphs}
        quant = None
        if precision == "int8":
            from kdedge.export.quantize import quantize_graphs

            assert calib is not None
            try:
                chosen, q = quantize_graphs(
                    [fp32[g.name] for g in plan.stages], [fp32[g.name] for g in plan.prefixes], work, calib=calib,
                    val=val, rules=rules, fp32_stage_acc=stage_acc, fp32_prefix_acc=prefix_acc,
                    max_drop=float(int8_max_drop), keep_fp32=int8_keep_fp32, scheme=int8_scheme, progress=say)
            except ExportError as e:
                if e.report is not None:
                    report["int8"] = e.report
                    from kdedge.export.verify import format_report

                    raise ExportError(f"{e}\n{format_report(report)}", report=report) from None
                raise
            report["int8"] = q
            precisions = dict(q["precision"])
            int8_rows = {(r["graph"], r["rule"]): r["int8"] for r in q["rows"]}
            stage_acc = [{r: int8_rows[(g.name, r)] for r in rules} for g in plan.stages]
            prefix_acc = [int8_rows[(g.name, "fused")] for g in plan.prefixes]
            from kdedge.cpu import int8_dot

            quant = {"precision": "int8", "format": "QDQ", "scheme": int8_scheme, "weight_bits": weight_bits(int8_scheme),
                     "why": why(int8_scheme), "exported_on": {"int8_dot": int8_dot()},
                     "calibration": describe(int8_scheme),
                     "n_calibration": calib.count(), "max_drop": float(int8_max_drop), "keep_fp32": int8_keep_fp32,
                     "fp32_graphs": [n for n, p in precisions.items() if p == "fp32"]}

        say("write bundle")
        (bd.tmp / spec.folder).mkdir()
        (bd.tmp / "profiles").mkdir()
        stage_entries, prefix_entries = [], []
        for g, t_out in zip(plan.graphs, [*t_stage, *t_prefix]):
            rel = f"{spec.folder}/{g.name}{spec.suffix}"
            shutil.move(str(chosen[g.name].path), bd.tmp / rel)
            ins = examples[g.name]
            outs = [t_out[t] for t in g.outputs]
            acc = stage_acc[g.index] if g.kind == "stage" else {r: prefix_acc[g.index] for r in rules}
            entry = _graph_entry(g, bd.tmp, rel, precisions[g.name], {k: v for k, v in meta[g.name].items()
                                                                       if k != "fallback_reason"},
                                 shapes_of(ins), [dtype_name(t) for t in ins], shapes_of(outs),
                                 [dtype_name(t) for t in outs], *costs[g.name], acc)
            (stage_entries if g.kind == "stage" else prefix_entries).append(entry)
        shutil.rmtree(work)
        bd.write_json("reports/verify.json", report)
        used = sorted({m["exporter"] for m in meta.values()})
        manifest = {
            **mf.base_manifest(),
            "family": plan.family,
            "model": {"class": plan.model_class, "meta": plan.meta},
            "classes": inf["class_names"],
            "input": {"name": "input", "shape": [None, *shape], "dtype": "float32", "layout": "NCHW"},
            "preprocessing": {k: inf[k] for k in ("dataset", "input_size", "resize", "scale", "mean", "std",
                                                  "channel_order")},
            "combine": {"default": rules[0], "supported": rules},
            "targets": [spec.name],
            "stages": stage_entries,
            "prefixes": prefix_entries,
            "evaluation": {"split": str(prov.pop("split", "val")), "n": report["n"]},
            "verification": summary(report),
            "quantization": quant,
            "reports": {"verify": mf.file_entry(bd.tmp, "reports/verify.json")},
            "provenance": mf.provenance(
                opset=opset, exporter="+".join(used), run_dir=None if prov.get("run_dir") is None else str(prov.pop("run_dir")),
                config=prov.pop("config", None), extra={**prov, **({"onnxsim": mf.package_version("onnxsim")} if simplify else {}),
                                                         "fallbacks": {n: m["fallback_reason"] for n, m in meta.items()
                                                                       if m.get("fallback_reason")}}),
        }
        if compile_spec is not None:
            from kdedge.targets import TargetError
            from kdedge.targets.build import add_target, graph_sources

            try:
                target_report = add_target(bd.tmp, manifest, target, compile_spec,
                                           graph_sources(plan, examples, bd.tmp, spec.folder, spec.suffix),
                                           verify_x=val.first(64), progress=say)
            except TargetError as e:
                raise ExportError(str(e)) from None
            manifest["provenance"]["targets"] = {target: target_report}
        return bd.commit(manifest)


def export_run(run_dir: str | Path, out: str | Path, *, data_root: str | None = None, split: str = "val",
               calib_size: int = 256, val_limit: int | None = None, **kw: Any) -> Path:
    """Export a finished training run (``kdedge export RUN_DIR``).

    Args:
        run_dir: a run directory written by ``kdedge train`` (with its final weights).
        out: the bundle directory to create.
        data_root: where the run's dataset lives now (cifar/imagefolder moved machines).
        split: the split that verifies the export and gives the manifest's accuracies (``val``
            or ``test``).
        calib_size: INT8: the number of training images (eval transform) to calibrate on,
            evenly spaced over the training pool.
        val_limit: verify on at most this many images (None: the whole split).
        **kw: everything else of :func:`export` (target, precision, opset, simplify, force, …).

    Raises:
        ExportError: the run directory has no finished checkpoint, or :func:`export` fails.

    Example:
        >>> export_run("runs/hne-demo", "hne.kdedge", precision="int8")
    """
    if split not in ("val", "test"):
        raise ExportError(f"split must be 'val' or 'test', got {split!r}")
    try:
        from kdedge.train.run import load_trained
    except ImportError as e:  # pragma: no cover - a broken install
        raise ExportError(f"cannot read run directories: {e}") from None
    try:
        run = load_trained(run_dir, data_root=data_root)
    except ExportError:
        raise
    except ValueError as e:  # RunError, ConfigError, DataError: already one clear line
        raise ExportError(str(e)) from None
    splits = run.splits()
    val_ds = getattr(splits, split)
    if val_ds is None or len(val_ds) == 0:
        raise ExportError(f"the run's {split} split is empty; export with split='test' (--split test)")
    calib = None
    if kw.get("precision") == "int8":
        train = splits.train
        if hasattr(train, "with_transform") and hasattr(val_ds, "transform"):
            train = train.with_transform(val_ds.transform)  # calibrate on un-augmented images
        from kdedge.export.data import Spread

        calib = Spread(train, calib_size)  # evenly spaced: the pool may be sorted by class
    prov = {"run_dir": str(Path(run_dir).absolute()), "config": run.config.to_dict(), "split": split}
    prov.update(kw.pop("provenance", None) or {})
    val = Batches(val_ds, kw.get("batch_size", 64), limit=val_limit)
    return export(run.model, out, info=run.info, val_data=val, calib_data=calib, provenance=prov,
                  calib_size=calib_size if calib is not None else None, **kw)
