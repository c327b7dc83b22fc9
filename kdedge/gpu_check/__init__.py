"""The GPU check: one command that proves kdedge's CUDA paths on a machine with an NVIDIA GPU.

It drives kdedge through its command line (``python -m kdedge.cli.main``) and its public
runtime API, each step in a subprocess with a time limit, and writes what it found under an
output folder: ``gpu_check.json`` (every step, strict JSON), ``summary.txt`` (a short table)
and ``log.txt`` (the output of every command). Parts, each under its own time cap and all
under one budget (``--budget-s``, 8 minutes by default):

- ``env``: Python, torch, CUDA, the GPU, onnxruntime and the packages kdedge needs;
- ``tests``: pytest on every test file holding a test marked ``cuda`` (on a GPU, a test whose
  name says ``cuda`` must not be skipped);
- ``bundles``: a tiny HNE and a tiny multi-exit model are trained on the device (scikit-learn's
  8x8 digits, one epoch), exported with ``--target torch --device cuda`` (HNE also in FP16),
  inspected, compared with the onnxruntime CPU reference through the runner (every depth,
  chained and fused, with and without CUDA graphs, within the documented tolerance), profiled
  with and without ``--cuda-graphs`` and run under deadlines;
- ``throughput``: training steps of the grouped HNE tree against a per-member loop
  (``bench/bench_hne_throughput.py``) for N = 2 … 16 members.

Modes: on a GPU (default; without one it stops with exit 2); ``--no-gpu`` runs ``env`` and
skips every GPU part with one line (what the test suite runs); ``--device cpu`` rehearses every
part on the CPU at tiny sizes, to check the check itself where no GPU is lent.

Exit status: 0 when every step passed, 1 when one failed or the budget ran out, 2 for bad
arguments or a missing requirement.

Example:
    bash scripts/gpu_check.sh "$OUT"                 # on the GPU machine (installs, then runs this)
    python -m kdedge.gpu_check out/gpu --no-gpu      # here: the GPU parts skipped, one line each
    python -m kdedge.gpu_check out/gpu --device cpu --parts bundles
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdedge.gpu_check.probes import (REQUIRED, ROOT, _agreement_main, _release, agreement, compare_probs,  # noqa: F401
                                     cuda_skips, cuda_test_files, declared_torch, environment, missing_modules,
                                     read_junit, write_inputs)
from kdedge.gpu_check.report import summary_text
from kdedge.io import atomic_write_json, atomic_write_text

PARTS = ("env", "tests", "bundles", "throughput")
GPU_PARTS = PARTS[1:]
BUDGET_S = 480.0  # on the GPU machine: 8 of the 10 minutes one device command may take
REHEARSAL_BUDGET_S = 1200.0  # a 2-core CPU machine exports the same bundles several times slower
# seconds a part may take at most with the 480 s budget (scaled with --budget-s), and the
# seconds kept back for the parts after it, so that a slow part cannot starve the throughput table
CAPS = {"env": 20.0, "tests": 150.0, "bundles": 400.0, "throughput": 120.0}
SLOW_STAGE_OVER_P99 = 10.0  # a stage of a deadline run after warm-up, against the profile's p99
TEST_TIMEOUT_S = 90.0  # one test's limit in the tests part, where pytest-timeout is installed
RESERVE = {"env": 0.0, "tests": 0.0, "bundles": 0.0, "throughput": 60.0}
# |torch - onnxruntime| <= atol + rtol * |onnxruntime| per probability, as docs/targets.md
# states for a target's outputs
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2)}
# tiny models on scikit-learn's digits (the only built-in dataset whose package the GPU machine
# has); accuracy does not matter here, only that every path runs and agrees
RECIPES: dict[str, dict[str, Any]] = {
    "hne": {"method": "hne", "seed": 0, "data": {"name": "digits", "batch_size": 64},
            "model": {"name": "hne", "args": {"config": "tiny", "B": 2}}, "train": {"epochs": 1},
            "loss": {"loss": "hd"}},
    "multiexit": {"method": "multiexit", "seed": 0, "data": {"name": "digits", "batch_size": 64},
                  "model": {"name": "multiexit", "args": {"backbone": "resnet20", "backbone_args": {"width": 4}}},
                  "train": {"epochs": 1}, "loss": {"loss": "distill"}},
}


class CheckError(ValueError):
    """A step of the check failed; the message is its one-line reason."""


@dataclass
class Step:
    """One step's record in ``gpu_check.json``."""

    part: str
    name: str
    status: str = "pass"  # pass | fail | skip
    seconds: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Check:
    """The state of one run of the check: budget, log, steps.

    Args:
        out: the output folder (created).
        device: ``cuda`` (a real GPU) or ``cpu`` (rehearsal).
        gpu: False in ``--no-gpu`` mode.
        budget_s: the whole check's time limit.
        work: where runs and bundles go (removed at the end unless ``keep_work``).
    """

    def __init__(self, out: Path, *, device: str, gpu: bool, budget_s: float, work: Path) -> None:
        self.out, self.device, self.gpu, self.work = out, device, gpu, work
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.budget_s = budget_s
        self.steps: list[Step] = []
        self.part_deadline = self.deadline
        self.log = open(out / "log.txt", "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # the working tree first, so that every child imports this kdedge
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

    @property
    def rehearsal(self) -> bool:
        return self.device == "cpu"

    def left(self) -> float:
        return min(self.deadline, self.part_deadline) - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(f"# {line}\n")
        self.log.flush()

    @contextlib.contextmanager
    def part(self, name: str, later: Sequence[str] = ()) -> Iterator[None]:
        """A part's time cap: its commands get at most what is left of it, of the budget, and
        of the budget less what the ``later`` parts keep back."""
        scale = self.budget_s / BUDGET_S
        self.part_deadline = min(time.monotonic() + CAPS[name] * scale,
                                 self.deadline - scale * sum(RESERVE[p] for p in later))
        try:
            yield
        finally:
            self.part_deadline = self.deadline

    @contextlib.contextmanager
    def step(self, part: str, name: str) -> Iterator[Step]:
        """Record a step: any exception in it (a command's failure is a CheckError) marks it
        failed, with its reason, and the check goes on with the next step."""
        s = Step(part, name)
        t0 = time.monotonic()
        try:
            yield s
        except CheckError as e:
            s.status, s.detail = "fail", str(e)
        except Exception as e:  # a bug in the check or an unexpected answer: recorded, the check goes on
            s.status, s.detail = "fail", f"{type(e).__name__}: {e}"
        s.seconds = round(time.monotonic() - t0, 2)
        self.steps.append(s)
        self.say(f"{s.status.upper():4} {part:10} {name:44} {s.seconds:6.1f} s  {s.detail}".rstrip())

    def skip(self, part: str, name: str, reason: str) -> None:
        self.steps.append(Step(part, name, "skip", 0.0, reason))
        self.say(f"SKIP {part:10} {name:44} {0.0:6.1f} s  {reason}")

    def run(self, cmd: Sequence[str], *, what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command within what is left of the part's time; a non-zero exit is a CheckError
        naming its last line of stderr."""
        timeout = self.left()
        if timeout <= 1:
            raise CheckError(f"{what}: not run, the time budget is spent")
        self.log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        self.log.flush()
        # a session of its own, so that a time-out kills everything it started (pytest's children too)
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd or ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            self._log_output(stdout, stderr)
            raise CheckError(f"{what}: timed out after {timeout:.0f} s") from None
        except BaseException:  # Ctrl-C: leave nothing running
            _kill_group(proc)
            raise
        self._log_output(stdout, stderr)
        res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if proc.returncode != 0:
            raise CheckError(f"{what} exited {proc.returncode}: {_last_line(stderr) or _last_line(stdout)}")
        return res

    def _log_output(self, stdout: str, stderr: str) -> None:
        self.log.write(stdout[-200_000:])
        if stderr:
            self.log.write("\n[stderr]\n" + stderr[-200_000:])
        self.log.flush()

    def kdedge(self, *args: Any, what: str) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "kdedge.cli.main", *map(str, args)], what=what)

    def close(self) -> None:
        self.log.close()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# -- env ------------------------------------------------------------------------------------------


def part_env(ck: Check) -> dict[str, Any]:
    facts: dict[str, Any] = {}  # the report's "env", also when a check below fails
    with ck.step("env", "versions and device") as s:
        facts.update(environment(ck.device))
        v = facts["versions"]
        s.detail = (f"torch {v.get('torch')} (CUDA build {facts.get('torch_cuda_build')}), onnxruntime "
                    f"{v.get('onnxruntime')}, python {facts['python']}")
        if "gpu" in facts:
            s.detail += f", {facts['gpu']['name']}"
        if Path(facts["kdedge_path"]) != ROOT / "kdedge":
            raise CheckError(f"kdedge is imported from {facts['kdedge_path']}, not from this working tree ({ROOT})")
        floor, torch_version = declared_torch(), v.get("torch")
        facts["torch_declared"] = f">={floor}" if floor else None
        if floor and torch_version and _release(torch_version) < _release(floor):
            raise CheckError(f"torch {torch_version} is older than the torch>={floor} that pyproject.toml declares")
    return facts


# -- tests ----------------------------------------------------------------------------------------


def part_tests(ck: Check) -> None:
    with ck.step("tests", "pytest (files with cuda tests)") as s:
        files = cuda_test_files(ROOT / "tests")
        if not files:
            raise CheckError(f"no test file under {ROOT / 'tests'} holds a test marked cuda")
        xml = ck.work / "pytest.xml"
        # a few xdist workers where the cores allow (each builds the module fixtures again, so
        # only a machine with cores to spare gains: the GPU machine has 16)
        workers = min(4, (os.cpu_count() or 1) // 4)
        parallel = ["-n", str(workers)] if workers >= 2 and importlib.util.find_spec("xdist") else []
        # one test that hangs fails alone (with its stack) instead of taking the report with it
        per_test = [f"--timeout={TEST_TIMEOUT_S:.0f}"] if importlib.util.find_spec("pytest_timeout") else []
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *parallel, *per_test,
               f"--junit-xml={xml}",
               *[str(f.relative_to(ROOT)) for f in files]]
        try:
            res = ck.run(cmd, what="pytest")
            summary = _last_line(res.stdout)
        except CheckError as e:
            summary = str(e)
            if not xml.is_file():
                raise
        s.data = {"files": [str(f.relative_to(ROOT)) for f in files], "workers": workers if parallel else 1,
                  **read_junit(xml), "summary": summary}
        s.detail = summary
        if s.data["failed"] or s.data["error"]:
            raise CheckError(f"{summary}; failed: {', '.join(t['test'] for t in s.data['failed_tests'][:5])}")
        if ck.gpu and not ck.rehearsal:
            missed = cuda_skips(s.data["skipped_tests"])
            if missed:
                raise CheckError(f"{summary}; CUDA tests skipped on a GPU: "
                                 + "; ".join(f"{t['test']} ({t['reason']})" for t in missed[:3]))


# -- bundles --------------------------------------------------------------------------------------


def _recipe(ck: Check, family: str) -> Path:
    import yaml

    path = ck.work / f"{family}.yaml"
    atomic_write_text(path, yaml.safe_dump(RECIPES[family], sort_keys=False))
    return path


def _check_export(ck: Check, bundle: Path, precision: str) -> dict[str, Any]:
    """The manifest says the torch files were compiled for this device and verified there."""
    from kdedge.io import read_json_strict

    m = read_json_strict(bundle / "manifest.json")
    rep = m["provenance"]["targets"]["torch"]
    if rep.get("verified") != "onnxruntime":
        raise CheckError(f"torch files verified {rep.get('verified')!r}, not against onnxruntime")
    if (rep.get("options") or {}).get("device") != ck.device:
        raise CheckError(f"torch files were verified on {rep.get('options')}, not on {ck.device}")
    for s in [*m["stages"], *m.get("prefixes", [])]:
        f = s["files"]["torch"]
        if f.get("device") != ck.device or f.get("precision") != precision:
            raise CheckError(f"{s['name']}: torch file for {f.get('device')}/{f.get('precision')}, "
                             f"expected {ck.device}/{precision}")
    # the torch files' own check against onnxruntime, per group of graphs (stages, prefixes)
    groups = [g for g in (rep.get("graphs") or {}).values() if isinstance(g, dict)]
    if not groups or not all(g.get("passed") for g in groups):
        raise CheckError(f"the torch files' verification did not pass: {rep.get('graphs')}")
    return {"verified_on": rep.get("options"), "n": rep.get("n"),
            "torch_worst_ratio": max(float(g.get("worst_ratio") or 0.0) for g in groups),
            "onnx_verification": {k: m["verification"].get(k)
                                  for k in ("passed", "max_abs_error", "min_top1_agreement", "n")},
            "stages": len(m["stages"]), "prefixes": len(m.get("prefixes", []))}


def _latency(prof: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """graph -> batch -> {median, p99} in ms, from ``kdedge profile --json``."""
    return {g: {b: {k: float(v["latency_ms"][k]) for k in ("median", "p99")} for b, v in per.items()}
            for g, per in prof["graphs"].items()}


def _deadline_runs(ck: Check, fam: str, bundle: Path, x: Path, flags: list[str], lat: dict[str, Any],
                   stages: int) -> dict[str, Any]:
    """A deadline every depth fits (all requests reach the last stage) and, where the profile
    leaves room, one between stage 0's and the chain's p99 (recorded: how deep it went is timing)."""
    def run(deadline: float) -> list[dict[str, Any]]:
        res = ck.kdedge("run", bundle, "--target", "torch", "--device", ck.device, *flags, "--input", x, "--batch", 8,
                        "--deadline-ms", f"{deadline:.4f}", "--json", what=f"{fam} run --deadline-ms {deadline:.3g}")
        return json.loads(res.stdout)["results"]

    loose = run(1000.0)
    shallow = [r for r in loose if r["stage"] != stages - 1 or not r["budget_met"]]
    if shallow:
        raise CheckError(f"under a 1000 ms deadline {len(shallow)} of {len(loose)} requests stopped before the last "
                         f"stage or missed it")
    # after the runner's warm-up, no stage of a request should take many times what the
    # profile measured (on an H200, before warm-up ended with a full garbage collection, the
    # first request's stages took 33-500 ms against a p99 of 1-6 ms, in every eager run)
    over = [(r["stage_ms"][k] / lat[f"stage{k}"]["8"]["p99"], k) for r in loose for k in range(len(r["stage_ms"]))]
    worst, at = max(over)
    out: dict[str, Any] = {"loose_ms": 1000.0, "loose_all_full": True, "worst_stage_over_p99": worst,
                           "first_request_stage_ms": loose[0]["stage_ms"]}
    if worst > SLOW_STAGE_OVER_P99 and not ck.rehearsal:  # timing on a shared CPU machine is not a criterion
        out["slow"] = (f"after the warm-up, a request's stage{at} took {worst:.0f}x the profile's p99 at batch 8 "
                       f"(first request's stages: {', '.join(f'{m:.2f}' for m in loose[0]['stage_ms'])} ms)")
    s0, chain = lat["stage0"]["8"]["p99"], lat["chain"]["8"]["p99"]
    if chain > 1.2 * s0:
        tight = (s0 + chain) / 2
        got = run(tight)
        depth = [0] * stages
        for r in got:
            depth[r["stage"]] += 1
        out.update({"tight_ms": tight, "tight_depths": depth,
                    "tight_budget_met": sum(bool(r["budget_met"]) for r in got) / len(got)})
    return out


def _family(ck: Check, fam: str, x: Path, results: dict[str, Any]) -> None:
    run_dir, bundle = ck.work / f"{fam}-run", ck.work / f"{fam}.kdedge"
    with ck.step("bundles", f"{fam}: train 1 epoch on {ck.device}") as s:
        res = ck.kdedge("train", "-c", _recipe(ck, fam), "--out", run_dir, "--device", ck.device, "--quiet", "--json",
                        what=f"{fam} train")
        s.data = {"test": json.loads(res.stdout).get("test")}
    if not (run_dir / "run.json").is_file():
        ck.skip("bundles", f"{fam}: the rest", "no trained run")
        return
    variants = [("fp32", bundle)] + ([("fp16", ck.work / f"{fam}-fp16.kdedge")] if fam == "hne" else [])
    for precision, path in variants:
        if precision == "fp16" and ck.rehearsal:
            ck.skip("bundles", f"{fam}: export fp16", "FP16 torch files are for CUDA (rehearsal on the CPU)")
            continue
        with ck.step("bundles", f"{fam}: export torch {precision} {ck.device}") as s:
            ck.kdedge("export", run_dir, "--out", path, "--target", "torch", "--device", ck.device, "--precision",
                      precision, "--val-limit", 64, "--max-batch", 64, "--json", what=f"{fam} export {precision}")
            ck.kdedge("inspect", path, "--json", what=f"{fam} inspect")
            s.data = _check_export(ck, path, precision)
            s.detail = (f"verified on {ck.device} against onnxruntime on {s.data['n']} images, worst "
                        f"{s.data['torch_worst_ratio']:.2f} of the tolerance")
        if not (path / "manifest.json").is_file():
            continue
        atol, rtol = TOLERANCE[precision]
        for graphs in (False, True):
            name = f"{fam}: {precision} agrees with onnx cpu" + (" (cuda graphs)" if graphs else "")
            if graphs and ck.rehearsal:
                ck.skip("bundles", name, "CUDA graphs need a GPU (rehearsal on the CPU)")
                continue
            with ck.step("bundles", name) as s:
                out = ck.work / f"agree-{fam}-{precision}-{int(graphs)}.json"
                worker = "import sys; from kdedge.gpu_check import _agreement_main; _agreement_main(sys.argv[1:])"
                ck.run([sys.executable, "-c", worker, path, x, ck.device, int(graphs), atol, rtol, out],
                       what=f"{fam} agreement")
                rep = json.loads(out.read_text())
                s.data = {k: v for k, v in rep.items() if k != "cases"} | {"cases": len(rep["cases"])}
                s.detail = (f"max abs {_num(rep['max_abs'], '.2g')}, worst {_num(rep['worst_ratio'], '.2f')} of the "
                            f"tolerance ({atol:g}, {rtol:g}), {len(rep['cases'])} runs")
                results.setdefault("agreement", {})[f"{fam}-{precision}{'-graphs' if graphs else ''}"] = s.data
                if not rep["passed"]:
                    raise CheckError(f"torch on {ck.device} differs from onnxruntime: {s.detail}")
    if not (bundle / "manifest.json").is_file():
        return
    stages = len(json.loads((bundle / "manifest.json").read_text())["stages"])
    runs, warmup = (20, 5) if ck.rehearsal else (200, 30)
    for graphs in (False, True):
        label = "cuda graphs" if graphs else "eager"
        if graphs and ck.rehearsal:
            ck.skip("bundles", f"{fam}: profile + deadlines, {label}", "CUDA graphs need a GPU (rehearsal on the CPU)")
            continue
        flags = ["--cuda-graphs"] if graphs else []
        with ck.step("bundles", f"{fam}: profile + deadlines, {label}") as s:
            res = ck.kdedge("profile", bundle, "--target", "torch", "--device", ck.device, *flags, "--batch", "1,8",
                            "--runs", runs, "--warmup", warmup, "--no-plot", "--json", "--quiet",
                            what=f"{fam} profile {label}")
            prof = json.loads(res.stdout)
            key = f"torch-{ck.device}" + ("-cudagraphs" if graphs else "")
            if prof.get("run_key") != key:
                raise CheckError(f"the profile's run key is {prof.get('run_key')!r}, expected {key!r}")
            lat = _latency(prof)
            s.data = {"run_key": key, "latency_ms": lat, "runs": runs,
                      "deadlines": _deadline_runs(ck, fam, bundle, x, flags, lat, stages)}
            if "slow" in s.data["deadlines"]:
                raise CheckError(s.data["deadlines"]["slow"])
            s.detail = (f"chain p50 {lat['chain']['1']['median']:.3f} ms at batch 1, "
                        f"{lat['chain']['8']['median']:.3f} ms at 8; 1000 ms deadline: all {stages} stages")
            results.setdefault("profiles", {})[f"{fam}-{'graphs' if graphs else 'eager'}"] = s.data


def part_bundles(ck: Check, results: dict[str, Any], families: Sequence[str]) -> None:
    with ck.step("bundles", "input batch (16 digits)"):
        x = write_inputs(ck.work / "x.npy")
    for fam in families:
        _family(ck, fam, x, results)


# -- throughput -----------------------------------------------------------------------------------


def part_throughput(ck: Check, results: dict[str, Any]) -> None:
    with ck.step("throughput", "grouped tree vs per-member loop") as s:
        bench = ROOT / "bench" / "bench_hne_throughput.py"
        if not bench.is_file():
            raise CheckError(f"{bench} is missing: run the check from a kdedge working tree")
        out = ck.work / "throughput.json"
        if ck.rehearsal:  # tiny: this checks the plumbing, not the speed
            args = ["--config", "tiny", "--size", "8", "--channels", "1", "--classes", "10", "--batch", "8",
                    "--members", "2", "4", "--repeats", "2", "--warmup", "1", "--threads", "1"]
        else:  # the paper's HNE-small on CIFAR-sized inputs
            args = ["--config", "resnet_small", "--size", "32", "--batch", "128", "--members", "2", "4", "8", "16",
                    "--repeats", "15", "--warmup", "3", "--threads", "4"]
        ck.run([sys.executable, str(bench), "--device", ck.device, *args, "--json", out], what="bench_hne_throughput")
        data = json.loads(out.read_text())
        s.data = data
        results["throughput"] = data
        top = max(data["rows"], key=lambda r: r["members"])
        s.detail = (f"N={top['members']}: grouped {top['grouped_ms']:.1f} ms, per-member {top['per_member_ms']:.1f} ms "
                    f"({top['member_over_grouped']:.1f}x)")


# -- report ---------------------------------------------------------------------------------------


def run_check(out: Path, *, device: str | None, gpu: bool = True, parts: Sequence[str] = PARTS,
              budget_s: float | None = None, families: Sequence[str] = tuple(RECIPES), work: Path | None = None,
              keep_work: bool = False) -> dict[str, Any]:
    """Run the check and write ``gpu_check.json``, ``summary.txt`` and ``log.txt`` under ``out``.

    Args:
        out: the output folder (created if missing).
        device: ``cuda`` (needs a GPU) or ``cpu`` (rehearsal); None: ``cuda``.
        gpu: False skips every GPU part with one line (``--no-gpu``).
        parts: which of ``PARTS`` to run (``env`` always runs).
        budget_s: the time limit of the whole check (None: 480 s on a GPU, 1200 s in a rehearsal).
        families: which of ``RECIPES`` the bundles part trains and exports.
        work: where runs and bundles are written (default: a temporary folder).
        keep_work: keep ``work`` afterwards.

    Returns:
        The report written to ``gpu_check.json`` (``result``: pass or fail).

    Raises:
        ValueError: bad arguments, no GPU in GPU mode, a required package missing.

    Example:
        >>> run_check(Path("out/gpu"), device=None, gpu=False)["result"]
        'pass'
    """
    device = device or "cuda"
    budget_s = budget_s if budget_s is not None else REHEARSAL_BUDGET_S if device == "cpu" else BUDGET_S
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    unknown = sorted(set(families) - set(RECIPES))
    if unknown or not families:
        raise ValueError(f"--families takes a comma-separated subset of {', '.join(RECIPES)}, "
                         f"got {', '.join(families)!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device takes cuda or cpu (a rehearsal on the CPU), got {device!r}")
    if not (0 < budget_s <= 3600):
        raise ValueError(f"--budget-s must be in (0, 3600] seconds, got {budget_s}")
    if gpu:
        missing = missing_modules()
        if missing:
            raise ValueError(f"missing packages: {', '.join(missing)}; carry them as wheels (docs/targets.md, "
                             "GPU check: bash scripts/gpu_check.sh --fetch-wheels)")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("torch sees no CUDA device here; run with --no-gpu to check the script without one, "
                                 "or --device cpu to rehearse every part on the CPU")
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise ValueError(f"--work {work} must be a new or empty folder (runs and bundles are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="kdedge-gpu-check-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    ck = Check(out, device=device, gpu=gpu, budget_s=budget_s, work=work)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results: dict[str, Any] = {}
    mode = "no-gpu" if not gpu else ("rehearsal" if device == "cpu" else "gpu")
    if not gpu:
        device = "none"
    ck.say(f"kdedge GPU check: mode {mode}, device {device}, budget {budget_s:.0f} s, output {out}")
    try:
        with ck.part("env"):
            env = part_env(ck)
        chosen = [p for p in GPU_PARTS if p in parts]
        for i, name in enumerate(chosen):
            if not gpu:
                ck.skip(name, "(all)", "needs a GPU; skipped (--no-gpu)")
                continue
            with ck.part(name, later=chosen[i + 1:]):
                if name == "tests":
                    part_tests(ck)
                elif name == "bundles":
                    part_bundles(ck, results, families)
                else:
                    part_throughput(ck, results)
    finally:
        ck.close()
        if own_work and not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    counts = {k: sum(s.status == k for s in ck.steps) for k in ("pass", "fail", "skip")}
    report = {"format": "kdedge-gpu-check", "version": 1, "started": started, "mode": mode, "device": device,
              "gpu": gpu, "parts": [p for p in PARTS if p == "env" or p in parts], "families": list(families),
              "budget_s": budget_s,
              "seconds": round(time.monotonic() - ck.start, 1), "result": "fail" if counts["fail"] else "pass",
              "counts": counts, "env": env, "steps": [vars(s) for s in ck.steps], "results": results,
              "work": str(work) if (keep_work or not own_work) else None}
    atomic_write_json(out / "gpu_check.json", report)
    atomic_write_text(out / "summary.txt", summary_text(report))
    return report


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument answered in one line (as kdedge's commands answer)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"error: {message} (see python -m kdedge.gpu_check --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdedge.gpu_check OUT [--no-gpu | --device cpu] ...``; returns the exit status."""
    p = _Parser(prog="python -m kdedge.gpu_check", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (gpu_check.json, summary.txt, log.txt)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-gpu", action="store_true", help="skip every GPU part with one line")
    mode.add_argument("--device", choices=["cuda", "cpu"], default=None,
                      help="cuda (default) or cpu: rehearse every part on the CPU at tiny sizes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"time limit of the whole check (default {BUDGET_S:.0f} s; {REHEARSAL_BUDGET_S:.0f} s "
                        "with --device cpu)")
    p.add_argument("--families", default=",".join(RECIPES), help=f"bundles to build: subset of {','.join(RECIPES)}")
    p.add_argument("--work", type=Path, default=None, help="keep runs and bundles in this (new or empty) folder")
    p.add_argument("--keep-work", action="store_true", help="do not delete the temporary work folder")
    a = p.parse_args(argv)
    try:
        if a.out.exists() and not a.out.is_dir():
            raise ValueError(f"{a.out} is a file; the output must be a folder")
        parts = [s.strip() for s in a.parts.split(",") if s.strip()]
        families = [s.strip() for s in a.families.split(",") if s.strip()]
        report = run_check(a.out, device=a.device, gpu=not a.no_gpu, parts=parts, budget_s=a.budget_s,
                           families=families, work=a.work, keep_work=a.keep_work)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    c = report["counts"]
    print("\n" + summary_text(report, steps=False), end="")
    print(f"gpu check {report['result']}: {c['pass']} passed, {c['fail']} failed, {c['skip']} skipped in "
          f"{report['seconds']:.0f} s; wrote {a.out / 'summary.txt'} and {a.out / 'gpu_check.json'}")
    return 1 if report["result"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
