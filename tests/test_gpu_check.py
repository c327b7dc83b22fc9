"""The GPU check (``kdedge.gpu_check``, ``scripts/gpu_check.sh``) where no GPU is: the ``--no-gpu``
mode (every GPU part skipped with one line), its refusals, what makes it fail, and a slow
rehearsal on the CPU that runs the bundle and throughput parts end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kdedge.gpu_check as gc
from kdedge.io import read_json_strict

ROOT = Path(__file__).resolve().parents[1]


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], check=False, capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)


def test_no_gpu_mode_skips_each_gpu_part_with_one_line_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _script(str(out), "--no-gpu", "--no-install")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    skips = [ln for ln in res.stdout.splitlines() if ln.startswith("SKIP")]
    assert len(skips) == len(gc.GPU_PARTS)
    for part, line in zip(gc.GPU_PARTS, skips):
        assert line.split()[1] == part and "--no-gpu" in line
    report = read_json_strict(out / "gpu_check.json")  # strict JSON: no NaN, no duplicate keys
    assert report["result"] == "pass" and report["mode"] == "no-gpu"
    assert report["counts"] == {"pass": 1, "fail": 0, "skip": len(gc.GPU_PARTS)}
    assert [s["part"] for s in report["steps"]] == list(gc.PARTS)
    assert report["env"]["kdedge_path"] == str(ROOT / "kdedge")
    summary = (out / "summary.txt").read_text()
    assert "result: pass (1 passed, 0 failed, 3 skipped)" in summary
    assert sum(ln.startswith("SKIP") for ln in summary.splitlines()) == len(gc.GPU_PARTS)
    assert (out / "log.txt").is_file()


def test_without_a_gpu_the_gpu_mode_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "kdedge.gpu_check", str(out)], check=False, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.startswith("error: torch sees no CUDA device here") and res.stderr.count("\n") == 1
    assert "--no-gpu" in res.stderr and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--parts", "tests,bogus"], "unknown part(s) bogus; the parts are env, tests, bundles, throughput"),
    (["--families", "resnet"], "--families takes a comma-separated subset of hne, multiexit"),
    (["--budget-s", "nan"], "--budget-s must be in (0, 3600] seconds"),
    (["--budget-s", "0"], "--budget-s must be in (0, 3600] seconds"),
])
def test_bad_arguments_are_refused_in_one_line(args: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.main([str(tmp_path / "out"), "--no-gpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_options_are_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        gc.main(["out", "--no-gpu", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --device: not allowed with argument --no-gpu") and err.count("\n") == 1


def test_an_output_that_is_a_file_or_a_used_work_folder_is_refused(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert gc.main([str(f), "--no-gpu"]) == 2
    assert "is a file; the output must be a folder" in capsys.readouterr().err
    assert gc.main([str(tmp_path / "out"), "--no-gpu", "--work", str(tmp_path)]) == 2
    assert "must be a new or empty folder" in capsys.readouterr().err


def test_a_failed_step_fails_the_check_and_the_next_part_still_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_tests(ck: gc.Check) -> None:
        with ck.step("tests", "a step with a bug"):
            raise KeyError("graphs")

    def fine_throughput(ck: gc.Check, results: dict[str, Any]) -> None:
        with ck.step("throughput", "a passing step"):
            results["throughput"] = None

    monkeypatch.setattr(gc, "part_tests", broken_tests)
    monkeypatch.setattr(gc, "part_throughput", fine_throughput)
    out = tmp_path / "out"
    assert gc.main([str(out), "--device", "cpu", "--parts", "tests,throughput"]) == 1
    report = read_json_strict(out / "gpu_check.json")
    assert report["result"] == "fail" and report["mode"] == "rehearsal"
    assert [(s["part"], s["status"]) for s in report["steps"]] == [("env", "pass"), ("tests", "fail"),
                                                                  ("throughput", "pass")]
    assert report["steps"][1]["detail"] == "KeyError: 'graphs'"
    assert "FAIL tests" in (out / "summary.txt").read_text()


def test_a_command_past_its_time_is_killed_with_its_children(tmp_path: Path) -> None:
    ck = gc.Check(tmp_path, device="cpu", gpu=True, budget_s=3.0, work=tmp_path)
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(300)']); print(p.pid, flush=True); time.sleep(300)")
    t0 = time.monotonic()
    with pytest.raises(gc.CheckError, match="sleeper: timed out after 3 s"):
        ck.run([sys.executable, "-c", child], what="sleeper")
    assert time.monotonic() - t0 < 60
    ck.close()
    grandchild = int(re.search(r"^(\d+)$", (tmp_path / "log.txt").read_text(), re.MULTILINE).group(1))
    for _ in range(100):  # SIGKILL is immediate; the kernel may take a moment to show it
        status = Path(f"/proc/{grandchild}/status")
        state = status.read_text().split("State:")[1].split()[0] if status.exists() else "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.05)
    assert state in ("gone", "Z")
    (tmp_path / "late").mkdir()
    late = gc.Check(tmp_path / "late", device="cpu", gpu=True, budget_s=0.5, work=tmp_path)
    with pytest.raises(gc.CheckError, match="late: not run, the time budget is spent"):
        late.run([sys.executable, "-c", "pass"], what="late")
    late.close()


def test_compare_probs_passes_within_the_tolerance_only() -> None:
    import numpy as np

    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    atol, rtol = gc.TOLERANCE["fp32"]
    close = ref + 0.5 * (atol + rtol * ref) * np.array([[1, -1, 1], [-1, 1, -1]])
    assert gc.compare_probs(close, ref, atol=atol, rtol=rtol)["passed"]
    far = ref.copy()
    far[1, 2] += 2 * (atol + rtol * ref[1, 2])
    rep = gc.compare_probs(far, ref, atol=atol, rtol=rtol)
    assert not rep["passed"] and rep["worst_ratio"] == pytest.approx(2.0) and rep["top1_agreement"] == 1.0
    assert not gc.compare_probs(ref[:1], ref, atol=atol, rtol=rtol)["passed"]
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not gc.compare_probs(nan, ref, atol=atol, rtol=rtol)["passed"]


def test_pytest_results_are_read_and_cuda_skips_on_a_gpu_are_caught(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_targets_contract" name="test_contract[onnx]" time="0.1"/>
<testcase classname="tests.test_targets_contract" name="test_contract[torch-cuda]" time="0">
<skipped type="pytest.skip" message="torch sees no CUDA device here">skip</skipped></testcase>
<testcase classname="tests.test_targets_contract" name="test_contract[tensorrt]" time="0">
<skipped type="pytest.skip" message="TensorRT is not installed here">skip</skipped></testcase>
<testcase classname="tests.test_targets_contract" name="test_torch_cuda_graphs_match_eager" time="0.2">
<failure message="AssertionError: not close">trace</failure></testcase>
</testsuite></testsuites>""")
    rep = gc.read_junit(xml)
    assert {k: rep[k] for k in ("passed", "failed", "error", "skipped")} == {"passed": 1, "failed": 1, "error": 0,
                                                                              "skipped": 2}
    assert rep["failed_tests"][0]["reason"] == "AssertionError: not close"
    assert [t["test"] for t in gc.cuda_skips(rep["skipped_tests"])] == [
        "tests.test_targets_contract::test_contract[torch-cuda]"]


def test_the_tests_part_runs_the_files_that_hold_cuda_tests(tmp_path: Path) -> None:
    assert ROOT / "tests" / "test_targets_contract.py" in gc.cuda_test_files(ROOT / "tests")
    (tmp_path / "test_a.py").write_text("import pytest\n\n@pytest.mark.cuda\ndef test_x():\n    pass\n")
    (tmp_path / "test_b.py").write_text("def test_y():\n    pass\n")
    (tmp_path / "test_c.py").write_text("pytestmark = [pytest.mark.cuda]\n")
    (tmp_path / "helper.py").write_text("# pytest.mark.cuda\n")
    # a test that writes such a file holds the words in a string, not a cuda test (the check's
    # own tests did, and its slow CPU rehearsal ran out the tests part's time on the GPU)
    (tmp_path / "test_d.py").write_text('def test_z(p):\n    p.write_text("@pytest.mark.cuda\\ndef test_x(): pass")\n')
    assert gc.cuda_test_files(tmp_path) == [tmp_path / "test_a.py", tmp_path / "test_c.py"]
    assert ROOT / "tests" / "test_gpu_check.py" not in gc.cuda_test_files(ROOT / "tests")


def test_the_summary_tables_read_the_report(tmp_path: Path) -> None:
    lat = {"stage0": {"1": {"median": 0.25, "p99": 0.5}, "8": {"median": 0.3, "p99": 0.6}},
           "chain": {"1": {"median": 0.9, "p99": 1.25}, "8": {"median": 1.0, "p99": 1.5}}}
    report = {"started": "2026-01-01T00:00:00+00:00", "mode": "gpu", "device": "cuda", "gpu": True, "budget_s": 480.0,
              "seconds": 300.0, "result": "pass", "counts": {"pass": 1, "fail": 0, "skip": 0},
              "env": {"python": "3.12.3", "versions": {"torch": "2.11.0", "onnxruntime": "1.30.0"},
                      "gpu": {"name": "NVIDIA H200"}},
              "steps": [{"part": "env", "name": "versions and device", "status": "pass", "seconds": 1.0, "detail": ""}],
              "results": {"profiles": {"hne-eager": {"latency_ms": lat}, "hne-graphs": {"latency_ms": lat}},
                          "throughput": {"config": "resnet_small", "batch": 128, "input": [3, 32, 32],
                                         "machine": "NVIDIA H200, torch 2.11.0",
                                         "rows": [{"members": 16, "grouped_ms": 10.0, "per_node_ms": None,
                                                   "per_member_ms": 80.0, "member_over_grouped": 8.0}]}}}
    text = gc.summary_text(report)
    assert "kdedge GPU check, 2026-01-01T00:00:00+00:00, mode gpu, device cuda (NVIDIA H200)" in text
    assert "PASS env" in text
    assert "hne                    chain        8      1.000 (1.500)      1.000 (1.500)" in text
    assert " 16     10.00         -       80.00            8.00" in text
    assert "PASS env" not in gc.summary_text(report, steps=False)


@pytest.mark.slow
def test_a_cpu_rehearsal_trains_exports_compares_profiles_and_measures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "kdedge.gpu_check", str(out), "--device", "cpu", "--parts",
                          "bundles,throughput", "--families", "hne"], check=False, capture_output=True, text=True,
                         timeout=1500, cwd=ROOT)
    report = read_json_strict(out / "gpu_check.json")
    assert res.returncode == 0, (out / "summary.txt").read_text()
    steps = {s["name"]: s for s in report["steps"]}
    agree = steps["hne: fp32 agrees with onnx cpu"]["data"]
    # 3 depths x chained and fused x a batch of 16 and of 1 x capture and replay
    assert agree["passed"] and agree["worst_ratio"] <= 1.0 and agree["cases"] == 3 * 2 * 2 * 2
    prof = steps["hne: profile + deadlines, eager"]["data"]
    assert prof["run_key"] == "torch-cpu" and prof["deadlines"]["loose_all_full"]
    assert set(prof["latency_ms"]) >= {"stage0", "stage1", "stage2", "chain", "prefix2"}
    assert [r["members"] for r in report["results"]["throughput"]["rows"]] == [2, 4]
    skipped = [s["name"] for s in report["steps"] if s["status"] == "skip"]
    assert skipped == ["hne: fp32 agrees with onnx cpu (cuda graphs)", "hne: export fp16",
                       "hne: profile + deadlines, cuda graphs"]
    assert json.loads((out / "gpu_check.json").read_text())["work"] is None  # the temporary work folder is gone


def test_the_env_part_reads_the_declared_torch_floor(tmp_path: Path) -> None:
    floor = gc.declared_torch()
    assert floor is not None and gc._release(floor) >= (2, 0)
    p = tmp_path / "pyproject.toml"
    p.write_text('[project.optional-dependencies]\ntorch = ["torch>=2.11"]\n')
    assert gc.declared_torch(p) == "2.11"
    assert gc._release("2.11.0+cu130") >= gc._release("2.11") > gc._release("2.9.1")
    assert gc.declared_torch(tmp_path / "missing.toml") is None


class _Replies:
    """Stands in for a Check: ``kdedge run`` answers with the given per-stage times."""

    def __init__(self, stage_ms: list[list[float]], rehearsal: bool = False) -> None:
        self.stage_ms, self.rehearsal, self.device = stage_ms, rehearsal, "cuda"

    def kdedge(self, *args: Any, what: str) -> subprocess.CompletedProcess[str]:
        rows = [{"stage": len(ms) - 1, "budget_met": True, "stage_ms": ms} for ms in self.stage_ms]
        return subprocess.CompletedProcess(list(args), 0, json.dumps({"results": rows}), "")


@pytest.mark.parametrize(("first", "rehearsal", "slow"), [([1.0, 1.0], False, False), ([335.0, 1.0], False, True),
                                                          ([335.0, 1.0], True, False)])
def test_a_stage_far_over_the_profile_after_warm_up_fails_the_deadline_step_on_a_gpu(
        first: list[float], rehearsal: bool, slow: bool) -> None:
    lat = {"stage0": {"8": {"median": 1.0, "p99": 2.0}}, "stage1": {"8": {"median": 1.0, "p99": 2.0}},
           "chain": {"8": {"median": 2.0, "p99": 2.2}}}  # the chain is too close to stage 0 for a tight run
    out = gc._deadline_runs(_Replies([first, [1.0, 1.0]], rehearsal), "hne", Path("b"), Path("x"), [], lat, 2)
    assert out["first_request_stage_ms"] == first and out["worst_stage_over_p99"] == max(first) / 2.0
    assert ("slow" in out) == slow
    if slow:
        assert out["slow"].startswith("after the warm-up, a request's stage0 took 168x the profile's p99")
