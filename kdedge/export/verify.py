"""Parity of the exported graphs with torch, Polygraphy-style.

On validation images, every output of every graph (run as the runtime runs it: the ONNX
stages chained, each reading the carried tensors the previous ONNX stages produced) is
compared elementwise with torch's output ``b``::

    |a - b| <= atol + rtol * |b|          (every element; a = exported, b = torch)

and reported as max absolute error, max relative error ``|a - b| / max(|b|, atol)``, mean absolute
error, the number of elements outside the tolerance, and the *worst ratio*
``max |a - b| / (atol + rtol * |b|)`` (≤ 1 passes). The combined prediction after each stage,
under each supported rule, must agree with torch's top-1 on at least ``min_top1_agreement`` of
the images. The report (a dict, written to ``reports/verify.json``) also holds both
accuracies. :func:`format_report` prints it as a table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from kdedge.bundle.combine import combine
from kdedge.export.errors import ExportError
from kdedge.export.graphs import ModelPlan, run_torch
from kdedge.export.metrics import AccuracyMeter
from kdedge.export.ortrun import OrtChain


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria of the FP32 parity check (defaults suit FP32 CPU exports of CNNs)."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1_agreement: float = 0.99

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0 and self.atol + self.rtol > 0):
            raise ExportError(f"tolerances must be >= 0 and not both 0, got atol={self.atol}, rtol={self.rtol}")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ExportError(f"min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")


class _OutputStat:
    def __init__(self, tol: Tolerances) -> None:
        self.tol = tol
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.mismatches = 0
        self.nonfinite = 0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ExportError(f"exported output has shape {a.shape}, torch gives {b.shape}")
        finite = np.isfinite(a) & np.isfinite(b)
        self.nonfinite += int((~finite).sum() - (~np.isfinite(b)).sum())
        a, b = a[finite], b[finite]
        if a.size == 0:
            return
        err = np.abs(a - b)
        bound = self.tol.atol + self.tol.rtol * np.abs(b)
        self.max_abs = max(self.max_abs, float(err.max()))
        # relative to max(|b|, atol): near-zero references are the atol term's business
        self.max_rel = max(self.max_rel, float((err / np.maximum(np.abs(b), max(self.tol.atol, 1e-12))).max()))
        self.worst = max(self.worst, float((err / np.maximum(bound, 1e-30)).max()))
        self.sum_abs += float(err.sum())
        self.count += int(err.size)
        self.mismatches += int((err > bound).sum())

    def result(self, name: str, tensor: str) -> dict[str, Any]:
        return {"name": name, "tensor": tensor, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "mean_abs": self.sum_abs / max(self.count, 1), "worst_ratio": self.worst,
                "mismatches": self.mismatches, "nonfinite": self.nonfinite,
                "passed": self.mismatches == 0 and self.nonfinite == 0}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def verify(plan: ModelPlan, stages: OrtChain, prefixes: OrtChain | None, batches: Iterable[tuple[np.ndarray, np.ndarray]],
           tol: Tolerances, target: str = "onnx", precision: str = "fp32",
           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compare the exported graphs with torch on ``batches``; return the report (see module doc).

    ``progress(n)`` is called after each batch with the number of images in it.
    """
    rules = list(plan.rules)
    stat = {g.name: [_OutputStat(tol) for _ in g.outputs] for g in plan.graphs}
    members = plan.members
    ort_meter, torch_meter = AccuracyMeter(members, rules), AccuracyMeter(members, rules)
    agree = np.zeros((len(members), len(rules)), dtype=np.int64)
    max_prob = np.zeros((len(members), len(rules)))
    pre = {"agree": np.zeros(len(plan.prefixes), np.int64), "ort": np.zeros(len(plan.prefixes), np.int64),
           "torch": np.zeros(len(plan.prefixes), np.int64)}
    n = 0
    for x, y in batches:
        t_stage, t_prefix = run_torch(plan, torch.from_numpy(x))
        o_stage = stages.run(x)
        for g, to, oo in zip(plan.stages, t_stage, o_stage):
            for s, t in zip(stat[g.name], g.outputs):
                s.update(oo[t], _np(to[t]))
        o_logits = stages.logits(o_stage)
        t_logits = [_np(to[g.logits_tensor]) for g, to in zip(plan.stages, t_stage)]
        p_ort = ort_meter.update(o_logits, y)
        p_torch = torch_meter.update(t_logits, y)
        agree += (p_ort == p_torch).sum(-1)
        for k in range(len(members)):
            for j, r in enumerate(rules):
                d = np.abs(combine(r, o_logits[: k + 1], members[: k + 1]) - combine(r, t_logits[: k + 1], members[: k + 1]))
                max_prob[k, j] = max(max_prob[k, j], float(d.max()))
        if prefixes is not None and plan.prefixes:
            o_pre = prefixes.run_each(x)
            for i, (g, to, oo) in enumerate(zip(plan.prefixes, t_prefix, o_pre)):
                for s, t in zip(stat[g.name], g.outputs):
                    s.update(oo[t], _np(to[t]))
                po, pt = oo[g.logits_tensor].argmax(-1), _np(to[g.logits_tensor]).argmax(-1)
                pre["agree"][i] += int((po == pt).sum())
                pre["ort"][i] += int((po == y).sum())
                pre["torch"][i] += int((pt == y).sum())
        n += len(y)
        if progress is not None:
            progress(len(y))
    if n == 0:
        raise ExportError("verification needs labelled validation images; the validation data is empty")

    graphs = []
    for g in plan.graphs:
        outs = [s.result(name, t) for s, name, t in zip(stat[g.name], g.spec.outputs, g.outputs)]
        graphs.append({"name": g.name, "kind": g.kind, "precision": precision, "outputs": outs,
                       "passed": all(o["passed"] for o in outs)})
    ort_acc, torch_acc = ort_meter.result(), torch_meter.result()
    combined = []
    for k, g in enumerate(plan.stages):
        for j, r in enumerate(rules):
            a = float(agree[k, j] / n)
            combined.append({"graph": g.name, "rule": r, "members": g.members_total, "top1_agreement": a,
                             "max_abs_prob": float(max_prob[k, j]), "accuracy": ort_acc[k][r],
                             "accuracy_torch": torch_acc[k][r], "passed": a >= tol.min_top1_agreement})
    for i, g in enumerate(plan.prefixes):
        a = float(pre["agree"][i] / n)
        combined.append({"graph": g.name, "rule": "fused", "members": g.members_total, "top1_agreement": a,
                         "max_abs_prob": None, "accuracy": float(pre["ort"][i] / n),
                         "accuracy_torch": float(pre["torch"][i] / n), "passed": a >= tol.min_top1_agreement})
    passed = all(g["passed"] for g in graphs) and all(c["passed"] for c in combined)
    return {"target": target, "precision": precision, **asdict(tol), "n": n, "passed": passed,
            "graphs": graphs, "combined": combined}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``verification`` block for a report."""
    outs = [o for g in report["graphs"] for o in g["outputs"]]
    return {
        "passed": bool(report["passed"]),
        "target": report["target"],
        "atol": report["atol"],
        "rtol": report["rtol"],
        "min_top1_agreement": report["min_top1_agreement"],
        "n": report["n"],
        "max_abs_error": max(o["max_abs"] for o in outs),
        "max_rel_error": max(o["max_rel"] for o in outs),
        "worst_ratio": max(o["worst_ratio"] for o in outs),
        "min_top1": min(c["top1_agreement"] for c in report["combined"]),
        "report": "reports/verify.json",
    }


def failures(report: dict[str, Any]) -> list[str]:
    """One short phrase per failed check."""
    out = []
    for g in report["graphs"]:
        for o in g["outputs"]:
            if not o["passed"]:
                why = f"{o['nonfinite']} non-finite values" if o["nonfinite"] else \
                    f"max abs {o['max_abs']:.3g}, {o['mismatches']} elements beyond atol+rtol*|ref|"
                out.append(f"{g['name']}:{o['name']} ({why})")
    for c in report["combined"]:
        if not c["passed"]:
            out.append(f"{c['graph']} {c['rule']} top-1 agreement {100 * c['top1_agreement']:.2f}%")
    return out


def check(report: dict[str, Any]) -> None:
    """Raise ExportError with the table when the report did not pass."""
    if report["passed"]:
        return
    bad = failures(report)
    raise ExportError(
        f"verification failed: exported {report['target']} graphs differ from torch beyond atol={report['atol']:g}, "
        f"rtol={report['rtol']:g}, top-1 agreement >= {report['min_top1_agreement']:g}: {'; '.join(bad[:4])}"
        f"{' …' if len(bad) > 4 else ''}; loosen --atol/--rtol only if these errors are acceptable\n"
        + format_report(report), report=report)


def format_report(report: dict[str, Any]) -> str:
    """The report as two plain-text tables (outputs; combined predictions)."""
    lines = [f"verification on {report['n']} images ({report['target']}, atol={report['atol']:g}, "
             f"rtol={report['rtol']:g}): {'PASSED' if report['passed'] else 'FAILED'}",
             f"{'graph':<10} {'prec':<5} {'output':<14} {'max abs':>10} {'max rel':>10} {'worst':>8} {'bad':>6}  ok"]
    for g in report["graphs"]:
        for o in g["outputs"]:
            lines.append(f"{g['name']:<10} {g['precision']:<5} {o['name'][:14]:<14} {o['max_abs']:>10.3g} "
                         f"{o['max_rel']:>10.3g} {o['worst_ratio']:>8.3g} {o['mismatches']:>6}  "
                         f"{'yes' if o['passed'] else 'NO'}")
    lines.append(f"{'after':<10} {'rule':<12} {'members':>7} {'top-1 agree':>11} {'acc export':>10} "
                 f"{'acc torch':>9}  ok")
    for c in report["combined"]:
        lines.append(f"{c['graph']:<10} {c['rule']:<12} {c['members']:>7} {100 * c['top1_agreement']:>10.2f}% "
                     f"{100 * c['accuracy']:>9.2f}% {100 * c['accuracy_torch']:>8.2f}%  {'yes' if c['passed'] else 'NO'}")
    q = report.get("int8")
    if q:
        lines.append(f"INT8 gate (max drop {q['max_drop']:g} points, keep_fp32={q['keep_fp32']}): "
                     f"{'PASSED' if q['passed'] else 'FAILED'}")
        lines.append(f"{'graph':<10} {'rule':<12} {'fp32':>8} {'int8':>8} {'drop':>7}  {'chosen':<6}")
        for row in q["rows"]:
            lines.append(f"{row['graph']:<10} {row['rule']:<12} {100 * row['fp32']:>7.2f}% {100 * row['int8']:>7.2f}% "
                         f"{row['drop']:>7.2f}  {row['precision']:<5}{'' if row['passed'] else '  FAILED'}")
    return "\n".join(lines)
