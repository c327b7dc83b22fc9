"""Verification against torch: the Polygraphy-style check, the report, and failing exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_anytime import digits, toy_bundle, trained_toy

from kdedge.export import ExportError, export, format_report
from kdedge.export.verify import Tolerances, _OutputStat


def test_elementwise_check_is_atol_plus_rtol_times_reference() -> None:
    tol = Tolerances(atol=0.01, rtol=0.1)
    ref = np.array([[1.0, 10.0, 0.0, -2.0]])
    ok = _OutputStat(tol)
    ok.update(ref + np.array([[0.11, 1.0, 0.01, -0.2]]) * 0.999, ref)  # just inside every bound
    r = ok.result("logits", "stage0__logits")
    assert r["passed"] and r["mismatches"] == 0 and r["worst_ratio"] <= 1.0
    assert r["max_abs"] == pytest.approx(0.999) and r["max_rel"] == pytest.approx(0.999)
    bad = _OutputStat(tol)
    bad.update(ref + np.array([[0.0, 0.0, 0.02, 0.0]]), ref)  # 0.02 > 0.01 + 0.1 * 0
    r = bad.result("logits", "stage0__logits")
    assert not r["passed"] and r["mismatches"] == 1 and r["worst_ratio"] == pytest.approx(2.0)
    nan = _OutputStat(tol)
    nan.update(np.array([[np.nan, 10.0, 0.0, -2.0]]), ref)
    assert not nan.result("x", "x")["passed"] and nan.result("x", "x")["nonfinite"] == 1
    with pytest.raises(ExportError, match="not both 0"):
        Tolerances(atol=0, rtol=0)


def test_report_in_the_bundle() -> None:
    path = toy_bundle()
    report = json.loads((path / "reports" / "verify.json").read_text())
    _, _, xv, yv, _ = digits()
    assert report["passed"] and report["n"] == len(yv) and report["target"] == "onnx"
    assert [g["name"] for g in report["graphs"]] == ["stage0", "stage1", "stage2", "prefix0", "prefix1", "prefix2"]
    assert [o["name"] for o in report["graphs"][0]["outputs"]] == ["logits", "f0"]
    for g in report["graphs"]:
        for o in g["outputs"]:
            assert o["passed"] and o["max_abs"] < 1e-3 and o["worst_ratio"] <= 1.0
    rows = {(c["graph"], c["rule"]): c for c in report["combined"]}
    assert set(rows) == {(f"stage{k}", r) for k in range(3) for r in ("mean_logits", "mean_probs", "last")} | \
        {(f"prefix{k}", "fused") for k in range(3)}
    for c in report["combined"]:
        assert c["top1_agreement"] >= 0.99 and abs(c["accuracy"] - c["accuracy_torch"]) <= 0.01
    # the toy model learned something: the full ensemble is well above chance (10 classes)
    assert rows[("stage2", "mean_logits")]["accuracy"] > 0.6
    # the manifest's accuracies are the report's
    manifest = json.loads((path / "manifest.json").read_text())
    for k, s in enumerate(manifest["stages"]):
        for rule, acc in s["accuracy"].items():
            assert acc == rows[(f"stage{k}", rule)]["accuracy"]
    text = format_report(report)
    assert "PASSED" in text and "stage1" in text and "prefix2" in text and "top-1 agree" in text


def test_tolerance_exceeded_fails_with_the_table_and_writes_nothing(tmp_path: Path) -> None:
    _, _, xv, yv, info = digits()
    out = tmp_path / "strict.kdedge"
    with pytest.raises(ExportError) as err:
        export(trained_toy(False), out, info=info, val_data=(xv[:64], yv[:64]), atol=1e-12, rtol=1e-12)
    msg = str(err.value)
    assert err.value.summary.startswith("verification failed: exported onnx graphs differ from torch")
    assert "max abs" in msg and "FAILED" in msg and "stage0" in msg.splitlines()[3]
    assert err.value.report is not None and not err.value.report["passed"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory left behind


def test_agreement_below_threshold_fails_the_check() -> None:
    from kdedge.export.verify import check

    report = json.loads((toy_bundle() / "reports" / "verify.json").read_text())
    check(report)  # passes as written
    row = next(c for c in report["combined"] if c["graph"] == "stage1" and c["rule"] == "last")
    row.update(top1_agreement=0.9, passed=False)
    report["passed"] = False
    with pytest.raises(ExportError, match=r"stage1 last top-1 agreement 90.00%"):
        check(report)
    with pytest.raises(ExportError, match=r"min_top1_agreement must be in \[0, 1\]"):
        Tolerances(min_top1_agreement=1.5)
