"""Static INT8 (QDQ) stage graphs with onnxruntime's quantization tools, behind an accuracy gate.

Each FP32 stage file goes through ``quant_pre_process`` (shape inference and graph
optimisation) and ``quantize_static`` (QDQ format, per-channel symmetric weights, MinMax
calibration). The *scheme* (:data:`SCHEMES`) names the activation type and the weight bits:

- ``u8s7`` (the default): uint8 asymmetric activations, weights in 7 bits (``reduce_range``).
- ``s8s7``: int8 symmetric activations (zero point 0, what TensorRT's explicit quantization
  reads), 7-bit weights.
- ``u8s8``, ``s8s8``: the same with full 8-bit weights.

Why 7 bits by default: onnxruntime's x86 kernels without VNNI (AVX2, AVX-512 without VNNI)
multiply uint8 activations by int8 weights with ``VPMADDUBSW``, which adds two products into a
*saturating* int16. With 8-bit weights a pair can reach 2 * 255 * 127 = 64770 and is clipped at
32767; with 7-bit weights it stays within 2 * 255 * 64 = 32640, so the kernel is exact on every
CPU. ``s8s8`` is no better: those kernels shift int8 activations to uint8 and take the same
path. Measured on the demo models (``bench/bench_int8_schemes.py``, docs/export.md), the same
INT8 files run on an emulated AVX2 CPU (qemu ``-cpu EPYC-Rome``) lose up to 2 points with
``u8s8`` and up to 32 with ``s8s8``, and compute the same as here with ``u8s7`` and ``s8s7``. A bundle is exported on one machine and run on others, so the
scheme must be safe on all of them; 8-bit weights are for bundles that only ever run on VNNI,
ARM or GPU targets. The manifest records the scheme, the weight bits and why.

A stage is calibrated on its *real* inputs: the calibration
images, and the carried tensors that the earlier FP32 stages compute from them.

The gate: with the chosen precisions, the accuracy of the combined prediction after every
stage, under every supported rule, is measured on the validation images and compared with the
FP32 bundle's. A stage that loses more than ``max_drop`` points fails the export, or, with
``keep_fp32``, stays FP32 (recorded in the manifest) and the chain is measured again. Stages
are decided in order, so a stage is judged with the precisions already chosen before it.
Fused prefixes read only the input and are judged on their own. No silent INT8 collapse.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from kdedge.export.errors import ExportError
from kdedge.export.metrics import chain_accuracy
from kdedge.export.ortrun import OrtChain, RunGraph

_EPS = 1e-9  # accuracy differences are ratios of counts: 0.60 - 0.59 must not exceed 1.0 point


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _reader(feeds: Iterable[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Reader()


def stage_feeds(chain: OrtChain, k: int, images: Iterable[tuple[np.ndarray, Any]]) -> Iterator[dict[str, np.ndarray]]:
    """The inputs of stage k on each calibration batch: the image and the carried tensors that
    stages 0..k-1 of ``chain`` (FP32) compute from it."""
    g = chain.graphs[k]
    for x, _ in images:
        feeds: dict[str, np.ndarray] = {"input": np.ascontiguousarray(x, np.float32)}
        for j in range(k):
            feeds.update(chain.run_one(j, feeds))
        yield {t: feeds[t] for t in g.inputs}


SCHEMES = ("u8s7", "s8s7", "u8s8", "s8s8")
DEFAULT_SCHEME = "u8s7"


def weight_bits(scheme: str) -> int:
    """7 for the reduced-range schemes (exact on every CPU), 8 otherwise."""
    return int(scheme[-1])


def signed_activations(scheme: str) -> bool:
    return scheme.startswith("s8")


def describe(scheme: str) -> str:
    """The manifest's description of a quantization scheme."""
    acts = "int8 symmetric" if signed_activations(scheme) else "uint8 asymmetric"
    bits = "int8 symmetric per channel" if weight_bits(scheme) == 8 else \
        "int8 symmetric per channel, 7-bit range [-64, 64]"
    return f"minmax; activations {acts}; weights {bits}"


def why(scheme: str) -> str:
    """The manifest's reason for the scheme: where its files compute exactly."""
    if weight_bits(scheme) == 7:
        return ("7-bit weights: a uint8 x int8 pair sum stays within int16 (2*255*64 <= 32767), so onnxruntime's "
                "VPMADDUBSW kernels on x86 CPUs without VNNI cannot saturate; exact on every CPU")
    return ("8-bit weights: pair sums can saturate int16 in onnxruntime's kernels on x86 CPUs without VNNI "
            "(AVX2, AVX-512 without VNNI); for bundles that run only on VNNI x86, ARM or GPU targets")


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ExportError(f"unknown INT8 scheme {scheme!r}; known: {', '.join(SCHEMES)} (default {DEFAULT_SCHEME})")


def _remedy(scheme: str) -> str:
    """What to do about a graph that fails the gate; first the likely cause where there is one."""
    from kdedge.cpu import saturates_full_range_int8

    first = ""
    if weight_bits(scheme) == 8 and saturates_full_range_int8():
        first = (f"this CPU has no VNNI, where {scheme}'s 8-bit weights saturate: use --int8-scheme "
                 f"{scheme[:2]}s7; otherwise ")
    return (f"{first}keep FP32 for it with --int8-keep-fp32, allow more with --int8-max-drop, or export with "
            "--precision fp32")


def quantize_file(src: Path, dst: Path, feeds: Iterable[dict[str, np.ndarray]], scheme: str = DEFAULT_SCHEME) -> None:
    """FP32 ONNX ``src`` -> QDQ INT8 ``dst``, calibrated on ``feeds`` (one dict per batch)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    check_scheme(scheme)
    acts = QuantType.QInt8 if signed_activations(scheme) else QuantType.QUInt8
    extra = {"ActivationSymmetric": signed_activations(scheme), "WeightSymmetric": True}

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        with _quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            quantize_static(str(pre), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=acts, weight_type=QuantType.QInt8,
                            reduce_range=weight_bits(scheme) == 7, calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    except ExportError:
        raise
    except Exception as e:  # onnxruntime's tools raise many types
        raise ExportError(f"INT8 quantization of {src.stem} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); export with --precision fp32") from None
    finally:
        pre.unlink(missing_ok=True)
        for extra in dst.parent.glob(dst.stem + ".pre*"):
            extra.unlink(missing_ok=True)


def quantize_graphs(stage_graphs: list[RunGraph], prefix_graphs: list[RunGraph], out_dir: Path, *,
                    calib: Iterable[tuple[np.ndarray, Any]], val: Iterable[tuple[np.ndarray, np.ndarray]],
                    rules: list[str], fp32_stage_acc: list[dict[str, float]], fp32_prefix_acc: list[float],
                    max_drop: float, keep_fp32: bool, scheme: str = DEFAULT_SCHEME,
                    progress: Callable[[str], None] | None = None) -> tuple[dict[str, RunGraph], dict[str, Any]]:
    """Quantize every graph, gate accuracy, choose a precision per graph.

    Args:
        stage_graphs, prefix_graphs: the FP32 graphs (verified).
        out_dir: where the INT8 files go (``<name>.int8.onnx``).
        calib: calibration batches (training images).
        val: validation batches.
        rules: the supported combine rules.
        fp32_stage_acc, fp32_prefix_acc: accuracies of the FP32 graphs on ``val``.
        max_drop: largest accuracy loss allowed, in percentage points.
        keep_fp32: keep FP32 for a graph that fails the gate instead of failing.
        scheme: activation/weight scheme (see module doc).

    Returns:
        (graph name -> the chosen graph (its ``path`` is the INT8 or the FP32 file),
        the ``int8`` section of the verification report, with ``precision`` per graph).

    Raises:
        ExportError: a graph fails the gate and ``keep_fp32`` is False, or a stage still fails
            with FP32 because its carried inputs come from INT8 stages.
    """
    say = progress or (lambda _m: None)
    fp32_chain = OrtChain(stage_graphs)
    int8: dict[str, RunGraph] = {}
    for k, g in enumerate(stage_graphs):
        say(f"quantize {g.name}")
        dst = out_dir / f"{g.name}.int8.onnx"
        quantize_file(g.path, dst, stage_feeds(fp32_chain, k, calib), scheme)
        int8[g.name] = replace(g, path=dst)
    for g in prefix_graphs:
        say(f"quantize {g.name}")
        dst = out_dir / f"{g.name}.int8.onnx"
        quantize_file(g.path, dst, ({"input": np.ascontiguousarray(x, np.float32)} for x, _ in calib), scheme)
        int8[g.name] = replace(g, path=dst)

    precision = {g.name: "int8" for g in [*stage_graphs, *prefix_graphs]}
    rows: list[dict[str, Any]] = []
    passes = 0
    while True:
        passes += 1
        say(f"measure INT8 accuracy (pass {passes})")
        chain = OrtChain([int8[g.name] if precision[g.name] == "int8" else g for g in stage_graphs])
        acc, _, n = chain_accuracy(chain, val, rules)
        failing = None
        rows = []
        for k, g in enumerate(stage_graphs):
            for r in rules:
                drop = 100.0 * (fp32_stage_acc[k][r] - acc[k][r])
                ok = drop <= max_drop + _EPS
                rows.append({"graph": g.name, "rule": r, "fp32": fp32_stage_acc[k][r], "int8": acc[k][r],
                             "drop": drop, "precision": precision[g.name], "passed": ok})
                if not ok and failing is None:
                    failing = k
        if failing is None:
            break
        name = stage_graphs[failing].name
        if keep_fp32 and precision[name] == "int8":
            precision[name] = "fp32"
            continue
        worst = max((r for r in rows if r["graph"] == name), key=lambda r: r["drop"])
        report = {"max_drop": max_drop, "keep_fp32": keep_fp32, "n": n, "passed": False, "rows": rows}
        if precision[name] == "fp32":
            why = (f"{name} loses {worst['drop']:.2f} points even in FP32 because the tensors it reads come from "
                   f"INT8 stages; export with --precision fp32 or calibrate on more images")
        else:
            why = (f"INT8 {name} loses {worst['drop']:.2f} points ({worst['rule']}: {100 * worst['fp32']:.2f}% -> "
                   f"{100 * worst['int8']:.2f}%), more than the allowed {max_drop:g}; {_remedy(scheme)}")
        raise ExportError(why, report=report)

    if prefix_graphs:
        say("measure INT8 accuracy (prefixes)")
        pchain = OrtChain([int8[g.name] for g in prefix_graphs])
        correct = np.zeros(len(prefix_graphs), np.int64)
        for x, y in val:
            for i, lg in enumerate(pchain.logits(pchain.run_each(x))):
                correct[i] += int((lg.argmax(-1) == y).sum())
        pacc = [float(c / n) for c in correct]
        for i, g in enumerate(prefix_graphs):
            drop = 100.0 * (fp32_prefix_acc[i] - pacc[i])
            ok = drop <= max_drop + _EPS
            if not ok and keep_fp32:
                precision[g.name] = "fp32"
            rows.append({"graph": g.name, "rule": "fused", "fp32": fp32_prefix_acc[i], "int8": pacc[i], "drop": drop,
                         "precision": precision[g.name], "passed": ok or keep_fp32})
            if not ok and not keep_fp32:
                raise ExportError(
                    f"INT8 {g.name} loses {drop:.2f} points ({100 * fp32_prefix_acc[i]:.2f}% -> {100 * pacc[i]:.2f}%), "
                    f"more than the allowed {max_drop:g}; {_remedy(scheme)}",
                    report={"max_drop": max_drop, "keep_fp32": keep_fp32, "passed": False, "rows": rows})
    for r in rows:  # a graph kept in FP32 passes with its FP32 accuracy
        r["precision"] = precision[r["graph"]]
    chosen = {g.name: (int8[g.name] if precision[g.name] == "int8" else g) for g in [*stage_graphs, *prefix_graphs]}
    return chosen, {"max_drop": max_drop, "keep_fp32": keep_fp32, "n": n, "passed": True, "passes": passes,
                    "precision": precision, "rows": rows}
