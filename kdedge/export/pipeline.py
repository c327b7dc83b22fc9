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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from kdedge.bundle import writer as mf
from kdedge.export.data import Batches
from kdedge.export.errors import ExportError
from kdedge.export.graphs import Graph, ModelPlan, graph_example_inputs, plan_model, run_torch, shapes_of
from kdedge.export.onnx import EXPORTERS, check_opset, dtype_name, export_graph
from kdedge.export.pad import BLOCK, PAD_BLOCKS
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
           max_batch: int = 64, target_options: dict[str, Any] | None = None, pad_channels: int = BLOCK) -> Path:
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
        pad_channels: zero-pad the channels per group of grouped convolutions to multiples of
            this (16: onnxruntime's NCHWc block with AVX-512, a multiple of AVX2's 8; 0: do
            not), so that onnxruntime runs them in its blocked layout
            (:mod:`kdedge.export.pad`). Outputs are unchanged; the padded layers compute up to
            ``round_up(c, 16) / c`` times their MACs where the CPU has no such layout.

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
                       tspec=(device, max_batch, dict(target_options or {})), pad_channels=pad_channels)
    finally:  # export runs in eval mode; give the caller's model back as it was
        for m, was in flags:
            m.training = was


@dataclass
class _Request:
    """A checked export request: what :func:`_export`'s steps share."""

    out: Path
    force: bool
    target: str
    compile_spec: Any          # CompileSpec of a further target, None for the ONNX reference alone
    precision: str             # of the ONNX reference
    opset: int
    exporter: str
    simplify: bool
    tolerances: Tolerances
    int8_max_drop: float
    int8_keep_fp32: bool
    int8_scheme: str
    pad_channels: int          # block the grouped channels are padded to (0: not padded)
    info: dict[str, Any]
    provenance: dict[str, Any]
    say: Progress


def _check_request(out: Path, *, info: Any, target: str, precision: str, opset: int, simplify: bool,
                   int8_max_drop: float, int8_keep_fp32: bool, provenance: dict[str, Any] | None, force: bool,
                   progress: Progress | None, tol: tuple[float, float, float], exporter: str, int8_scheme: str,
                   tspec: tuple[str | None, int, dict[str, Any]], pad_channels: int) -> _Request:
    """Step 1: refuse what cannot be exported before anything is computed or written."""
    from kdedge.export.quantize import check_scheme
    from kdedge.registry import suggest
    from kdedge.targets import TARGETS, TEST_TARGETS, CompileSpec, Target, TargetError, get_target

    missing = Target._missing(EXPORT_REQUIRES)
    if missing:  # the ONNX reference is written for every target
        raise ExportError(f"export needs {', '.join(missing)}, which is not installed; install it with: "
                          "pip install 'kdedge[train]'")
    if target not in TARGETS and target not in TEST_TARGETS:
        raise ExportError(f"unknown export target {target!r}; {suggest(target, TARGETS)}")
    compile_spec = None
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
    check_opset(opset)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    if not (isinstance(int8_max_drop, (int, float)) and math.isfinite(int8_max_drop) and int8_max_drop >= 0):
        raise ExportError(f"int8_max_drop must be a number of points >= 0, got {int8_max_drop!r}")
    check_scheme(int8_scheme)
    if isinstance(pad_channels, bool) or not isinstance(pad_channels, int) or pad_channels not in PAD_BLOCKS:
        raise ExportError(f"pad_channels must be one of {', '.join(map(str, PAD_BLOCKS))} (0: no padding), "
                          f"got {pad_channels!r}")
    tolerances = Tolerances(*tol)
    if out.absolute().parent.is_dir():
        mf.recover(out.absolute())
    mf.check_destination(out.absolute(), force)
    return _Request(out=out, force=force, target=target, compile_spec=compile_spec, precision=precision, opset=opset,
                    exporter=exporter, simplify=simplify, tolerances=tolerances, int8_max_drop=float(int8_max_drop),
                    int8_keep_fp32=int8_keep_fp32, int8_scheme=int8_scheme, pad_channels=pad_channels,
                    info=normalise_info(info),
                    provenance=dict(provenance or {}), say=progress or (lambda _m: None))


def _read_data(req: _Request, val_data: Any, calib_data: Any, batch_size: int,
               calib_size: int | None) -> tuple[Batches, np.ndarray, Batches | None]:
    """Step 2: the validation batches (and their first two images, the example input) and, for
    INT8, the calibration batches."""
    try:
        val = Batches(val_data, batch_size)
        ex = val.first(2)
    except ExportError:
        raise
    except ValueError as e:
        raise ExportError(f"validation data: {e}") from None
    calib = None
    if req.precision == "int8":
        if calib_data is None:
            raise ExportError("precision int8 needs calibration images: pass calib_data (a few hundred training images)")
        try:
            calib = Batches(calib_data, batch_size, limit=calib_size, keep_unlabelled=True)
            calib.first(1)
        except ValueError as e:
            raise ExportError(f"calibration data: {e}") from None
    return val, ex, calib


@dataclass
class _Traced:
    """Step 3's result: the model's graphs, their example inputs and torch outputs, their costs."""

    plan: ModelPlan
    shape: tuple[int, int, int]
    examples: dict[str, tuple[Tensor, ...]]
    outputs: list[dict[str, Tensor]]   # per graph of plan.graphs, torch's outputs on the example
    costs: dict[str, tuple[int, int]]


def _trace(model: nn.Module, req: _Request, ex: np.ndarray) -> _Traced:
    """Step 3: slice the model into its graphs and run them in torch on the example input."""
    plan = plan_model(model)
    shape = (req.info["in_channels"], *req.info["input_size"])
    if tuple(ex.shape[1:]) != tuple(shape):
        raise ExportError(f"validation images are {tuple(ex.shape[1:])}, the dataset info says {shape} (C, H, W)")
    if len(ex) == 1:
        ex = np.concatenate([ex, ex])  # batch 2: keeps exporters from specialising on batch 1
    x_ex = torch.from_numpy(ex)
    examples = graph_example_inputs(plan, x_ex)
    t_stage, t_prefix = run_torch(plan, x_ex)
    for g, o in zip(plan.graphs, [*t_stage, *t_prefix]):
        lg = o[g.logits_tensor]
        if lg.dim() != 2 or lg.shape[1] != req.info["num_classes"]:
            raise ExportError(f"{g.name} logits have shape {tuple(lg.shape)}, expected [N, {req.info['num_classes']}]")
    return _Traced(plan, shape, examples, [*t_stage, *t_prefix], _costs(plan, shape))


def _write_onnx(req: _Request, tr: _Traced, work: Path) -> tuple[dict[str, dict[str, Any]], dict[str, RunGraph]]:
    """Step 4: every graph to ONNX under ``work`` (progress per graph); their export records and run views."""
    from kdedge.export.fold import fold_batchnorm
    from kdedge.export.pad import pad_file

    meta: dict[str, dict[str, Any]] = {}
    for i, g in enumerate(tr.plan.graphs):
        req.say(f"export {g.name} ({i + 1}/{len(tr.plan.graphs)})")
        module, folded = fold_batchnorm(g.module)  # half the operators to trace (kdedge/export/fold.py)
        meta[g.name] = export_graph(module, tr.examples[g.name], work / f"{g.name}.onnx", inputs=g.inputs,
                                    outputs=g.outputs, opset=req.opset, exporter=req.exporter, simplify=req.simplify)
        meta[g.name]["folded_batchnorm"] = folded
        if req.pad_channels:  # zero channels so that onnxruntime's blocked layout takes grouped layers
            meta[g.name]["padded_convs"] = pad_file(work / f"{g.name}.onnx", req.pad_channels)
        del module  # one folded copy at a time
    fp32 = {g.name: RunGraph(g.name, work / f"{g.name}.onnx", tuple(g.inputs), tuple(g.outputs), g.logits_tensor,
                             g.spec.members) for g in tr.plan.graphs}
    return meta, fp32


@dataclass
class _Verified:
    """Steps 5-6: the graphs kept (FP32 or INT8), their precision and accuracy, the reports."""

    chosen: dict[str, RunGraph]
    precisions: dict[str, str]
    stage_acc: list[dict[str, float]]
    prefix_acc: list[float]
    report: dict[str, Any]
    quantization: dict[str, Any] | None


def _verify(req: _Request, plan: ModelPlan, fp32: dict[str, RunGraph], val: Batches) -> _Verified:
    """Step 5: the ONNX graphs against torch, chained as the runner chains them."""
    stage_chain = OrtChain([fp32[g.name] for g in plan.stages])
    prefix_chain = OrtChain([fp32[g.name] for g in plan.prefixes]) if plan.prefixes else None
    req.say("verify against torch")
    report = verify(plan, stage_chain, prefix_chain, val, req.tolerances, target=req.target)
    check(report)
    stage_acc = [{r: c["accuracy"] for c in report["combined"] if c["graph"] == g.name for r in [c["rule"]]}
                 for g in plan.stages]
    prefix_acc = [next(c["accuracy"] for c in report["combined"] if c["graph"] == g.name) for g in plan.prefixes]
    return _Verified(fp32, {g.name: "fp32" for g in plan.graphs}, stage_acc, prefix_acc, report, None)


def _quantize(req: _Request, plan: ModelPlan, v: _Verified, work: Path, calib: Batches, val: Batches) -> _Verified:
    """Step 6 (INT8): quantize behind the accuracy gate; the graphs and accuracies kept."""
    from kdedge.cpu import int8_dot
    from kdedge.export.quantize import describe, quantize_graphs, weight_bits, why
    from kdedge.export.verify import format_report

    rules = list(plan.rules)
    try:
        chosen, q = quantize_graphs(
            [v.chosen[g.name] for g in plan.stages], [v.chosen[g.name] for g in plan.prefixes], work, calib=calib,
            val=val, rules=rules, fp32_stage_acc=v.stage_acc, fp32_prefix_acc=v.prefix_acc,
            max_drop=req.int8_max_drop, keep_fp32=req.int8_keep_fp32, scheme=req.int8_scheme, progress=req.say)
    except ExportError as e:
        if e.report is not None:
            v.report["int8"] = e.report
            raise ExportError(f"{e}\n{format_report(v.report)}", report=v.report) from None
        raise
    v.report["int8"] = q
    precisions = dict(q["precision"])
    int8_rows = {(r["graph"], r["rule"]): r["int8"] for r in q["rows"]}
    quant = {"precision": "int8", "format": "QDQ", "scheme": req.int8_scheme, "weight_bits": weight_bits(req.int8_scheme),
             "why": why(req.int8_scheme), "exported_on": {"int8_dot": int8_dot()},
             "calibration": describe(req.int8_scheme), "n_calibration": calib.count(), "max_drop": req.int8_max_drop,
             "keep_fp32": req.int8_keep_fp32, "fp32_graphs": [n for n, p in precisions.items() if p == "fp32"]}
    return _Verified(chosen, precisions, [{r: int8_rows[(g.name, r)] for r in rules} for g in plan.stages],
                     [int8_rows[(g.name, "fused")] for g in plan.prefixes], v.report, quant)


def _place_graphs(bd: Any, tr: _Traced, v: _Verified, meta: dict[str, dict[str, Any]],
                  folder: str, suffix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Step 7: move the kept graph files into the bundle; their manifest entries (stages, prefixes)."""
    rules = list(tr.plan.rules)
    (bd.tmp / folder).mkdir()
    (bd.tmp / "profiles").mkdir()
    stage_entries, prefix_entries = [], []
    for g, t_out in zip(tr.plan.graphs, tr.outputs):
        rel = f"{folder}/{g.name}{suffix}"
        shutil.move(str(v.chosen[g.name].path), bd.tmp / rel)
        ins = tr.examples[g.name]
        outs = [t_out[t] for t in g.outputs]
        acc = v.stage_acc[g.index] if g.kind == "stage" else {r: v.prefix_acc[g.index] for r in rules}
        entry = _graph_entry(g, bd.tmp, rel, v.precisions[g.name],
                             {k: val for k, val in meta[g.name].items() if k != "fallback_reason"},
                             shapes_of(ins), [dtype_name(t) for t in ins], shapes_of(outs),
                             [dtype_name(t) for t in outs], *tr.costs[g.name], acc)
        (stage_entries if g.kind == "stage" else prefix_entries).append(entry)
    return stage_entries, prefix_entries


def _manifest(req: _Request, bd: Any, tr: _Traced, v: _Verified, meta: dict[str, dict[str, Any]],
              entries: tuple[list[dict[str, Any]], list[dict[str, Any]]], reference: str) -> dict[str, Any]:
    """Step 8: the manifest of the ONNX reference bundle (docs/bundle.md)."""
    rules = list(tr.plan.rules)
    inf, prov = req.info, dict(req.provenance)
    used = sorted({m["exporter"] for m in meta.values()})
    return {
        **mf.base_manifest(),
        "family": tr.plan.family,
        "model": {"class": tr.plan.model_class, "meta": tr.plan.meta},
        "classes": inf["class_names"],
        "input": {"name": "input", "shape": [None, *tr.shape], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": {k: inf[k] for k in ("dataset", "input_size", "resize", "scale", "mean", "std",
                                              "channel_order")},
        "combine": {"default": rules[0], "supported": rules},
        "targets": [reference],
        "stages": entries[0],
        "prefixes": entries[1],
        "evaluation": {"split": str(prov.pop("split", "val")), "n": v.report["n"]},
        "verification": summary(v.report),
        "quantization": v.quantization,
        "reports": {"verify": mf.file_entry(bd.tmp, "reports/verify.json")},
        "provenance": mf.provenance(
            opset=req.opset, exporter="+".join(used),
            run_dir=None if prov.get("run_dir") is None else str(prov.pop("run_dir")),
            config=prov.pop("config", None),
            extra={**prov, **({"onnxsim": mf.package_version("onnxsim")} if req.simplify else {}),
                   "fallbacks": {n: m["fallback_reason"] for n, m in meta.items() if m.get("fallback_reason")}}),
    }


def _add_target(req: _Request, bd: Any, manifest: dict[str, Any], tr: _Traced, val: Batches,
                folder: str, suffix: str) -> None:
    """Step 9: compile and verify the further target's files beside the ONNX reference."""
    from kdedge.export.graphs import graph_sources
    from kdedge.targets import TargetError
    from kdedge.targets.build import add_target

    try:
        target_report = add_target(bd.tmp, manifest, req.target, req.compile_spec,
                                   graph_sources(tr.plan, tr.examples, bd.tmp, folder, suffix),
                                   verify_x=val.first(64), progress=req.say)
    except TargetError as e:
        raise ExportError(str(e)) from None
    manifest["provenance"]["targets"] = {req.target: target_report}


def _export(model: nn.Module, out: Path, *, info: Any, val_data: Any, calib_data: Any, target: str, precision: str,
            opset: int, simplify: bool, int8_max_drop: float, int8_keep_fp32: bool,
            provenance: dict[str, Any] | None, force: bool, progress: Progress | None,
            tol: tuple[float, float, float], exporter: str, batch_size: int, calib_size: int | None,
            int8_scheme: str, tspec: tuple[str | None, int, dict[str, Any]], pad_channels: int) -> Path:
    """The export, as named steps: check the request, read the data, trace in torch, write ONNX,
    verify, quantize (INT8), place the files, write the manifest, add a further target, commit."""
    from kdedge.targets import get_target

    req = _check_request(out, info=info, target=target, precision=precision, opset=opset, simplify=simplify,
                         int8_max_drop=int8_max_drop, int8_keep_fp32=int8_keep_fp32, provenance=provenance,
                         force=force, progress=progress, tol=tol, exporter=exporter, int8_scheme=int8_scheme,
                         tspec=tspec, pad_channels=pad_channels)
    val, ex, calib = _read_data(req, val_data, calib_data, batch_size, calib_size)
    tr = _trace(model, req, ex)
    ref = get_target("onnx")  # the reference: folder, suffix, name
    with mf.BundleDir(out, force) as bd:
        work = bd.tmp / "_work"
        work.mkdir()
        meta, fp32 = _write_onnx(req, tr, work)
        v = _verify(req, tr.plan, fp32, val)
        if req.precision == "int8":
            assert calib is not None
            v = _quantize(req, tr.plan, v, work, calib, val)
        req.say("write bundle")
        entries = _place_graphs(bd, tr, v, meta, ref.folder, ref.suffix)
        shutil.rmtree(work)
        bd.write_json("reports/verify.json", v.report)
        manifest = _manifest(req, bd, tr, v, meta, entries, ref.name)
        if req.compile_spec is not None:
            _add_target(req, bd, manifest, tr, val, ref.folder, ref.suffix)
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
