"""Threads per stage chosen by measurement (``Runner(threads="auto")``, ``kdedge run --threads
auto``) from profiles of several thread counts, and the default thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_runtime import toy_bundle

from kdedge.profile.latency import CHAIN, LatencyProfile, bundle_fingerprint, current_key, profile_filename
from kdedge.runtime import Deadline, Runner, open_bundle
from kdedge.targets.ort_session import OrtOptions, open_ort_session

GRAPHS = ["stage0", "stage1", "stage2", "prefix0", "prefix1", "prefix2", CHAIN]


def _profile(bundle, threads: int, p99: dict[str, float]) -> dict:
    device, setting, detail = current_key(threads)
    graphs = {g: {"1": {"latency_ms": {"min": v / 2, "mean": v / 2, "median": v / 2, "p90": v, "p95": v, "p99": v,
                                       "max": v, "n": 10}}} for g, v in p99.items()}
    return {"format": "kdedge-profile", "version": 1, "device": device, "setting": setting, "setting_detail": detail,
            "target": "onnx", "run_key": "", "threads": threads,
            "bundle": {"fingerprint": bundle_fingerprint(bundle, "onnx"), "family": bundle.family},
            "runs": 10, "warmup": 0, "batches": [1], "graphs": graphs}


@pytest.fixture
def bundle(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path):
    src = toy_bundle(tmp_path_factory.mktemp("bundles"))[0]
    b = open_bundle(shutil.copytree(src, tmp_path / "toy.kdedge"))
    one = {"stage0": 1.0, "stage1": 5.0, "stage2": 2.0, "prefix0": 1.0, "prefix1": 3.0, "prefix2": 9.0, CHAIN: 8.0}
    two = {"stage0": 2.0, "stage1": 1.0, "stage2": 2.0, "prefix0": 0.5, "prefix1": 4.0, "prefix2": 6.0, CHAIN: 5.0}
    for t, p99 in ((1, one), (2, two)):
        data = _profile(b, t, p99)
        (b.path / "profiles" / profile_filename(data["device"], data["setting"])).write_text(json.dumps(data))
    return b


def test_auto_picks_the_lowest_p99_per_graph_and_plans_with_it(bundle) -> None:
    made: dict[str, int] = {}

    def factory(b, entry, options):
        made[entry.name] = options.threads
        return open_ort_session(b, entry, options)

    with Runner(bundle, threads="auto", session_factory=factory) as r:
        # ties (stage2: 2.0 both) go to fewer threads
        assert r.threads_per_graph == {"stage0": 1, "stage1": 2, "stage2": 1, "prefix0": 2, "prefix1": 1,
                                       "prefix2": 2}
        assert made == {"stage0": 1, "stage1": 2, "stage2": 1}
        assert r.profile.stat("stage1", 1, "p99") == 1.0 and r.profile.stat("stage0", 1, "p99") == 1.0
        x = np.zeros((1, 1, 8, 8), np.float32)
        r.run(x, Deadline(1000.0, fused=True))
        assert made["prefix2"] == 2  # opened on first use with its own count
        # planned with the chosen statistics: 1 (stage0) + 1 (stage1, 2 threads) + 0.1 fits 2.2 ms, + 2 does not
        assert r.run(x, Deadline(2.2, latencies_ms=None, watchdog=False)).stage.tolist() in ([0], [1])
        r.reload_profile()
        assert r.profile.stat("stage1", 1, "p99") == 1.0


def test_auto_ignores_profiles_that_do_not_apply(bundle) -> None:
    # another device's profile with a better stage0 must not be chosen
    data = _profile(bundle, 3, {g: 0.01 for g in GRAPHS})
    data["device"] = "another-device"
    (bundle.path / "profiles" / "another-device-cpu-3t.json").write_text(json.dumps(data))
    (bundle.path / "profiles" / "garbage.json").write_text("{")
    with Runner(bundle, threads="auto") as r:
        assert set(r.threads_per_graph.values()) <= {1, 2}


def test_auto_needs_profiles_and_the_onnx_target(bundle, tmp_path: Path) -> None:
    for p in (bundle.path / "profiles").glob("*.json"):
        p.unlink()
    with pytest.raises(Exception, match=r"--threads auto picks each stage's thread count.*--threads 1,2"):
        Runner(bundle, threads="auto")
    with pytest.raises(ValueError, match="cannot be combined with --profile"):
        Runner(bundle, threads="auto", profile=None)


def test_default_thread_count_is_one() -> None:
    """The default must not be the worst choice on a shared machine: with every CPU, onnxruntime's
    pools of consecutive stages compete for the cores (docs/runtime.md, "Threads")."""
    from kdedge.targets.threads import default_threads

    assert default_threads() == 1 and OrtOptions().resolved_threads == 1


@pytest.mark.parametrize("s0, chain, tight, loose", [
    (0.1, 0.6, 0.35, 1.2),       # between stage 0 and the chain
    (0.3, 0.32, 0.4, 0.82),      # chain barely above stage 0: never shorter than stage 0 + margin
    (5.0, 20.0, 12.5, 40.0),
])
def test_demo_deadlines_come_from_the_profile(bundle, s0, chain, tight, loose) -> None:
    from kdedge.profile.latency import demo_deadlines

    p99 = {"stage0": s0, "stage1": 1.0, "stage2": 1.0, "prefix0": 1.0, "prefix1": 1.0, "prefix2": 1.0, CHAIN: chain}
    prof = LatencyProfile(_profile(bundle, 1, p99))
    t, lo = demo_deadlines(prof)
    assert (t, lo) == (pytest.approx(tight), pytest.approx(loose))
    assert s0 + 0.1 <= t and lo >= chain and lo >= t


def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """onnxruntime's shared pool is process-wide: each case runs in a process of its own."""
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}{os.pathsep}{Path(__file__).parent}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)


def test_a_shared_pool_runs_every_stage_on_one_pool_and_is_keyed_apart(tmp_path: Path) -> None:
    src = toy_bundle(tmp_path)[0]
    code = f"""
import numpy as np, threading
from kdedge.runtime import Runner
from kdedge.targets.ort_session import OrtOptions, OrtSession
before = threading.active_count()
with Runner({str(src)!r}, threads=2, shared_pool=True) as r:
    assert r.run_key == "shared", r.run_key
    assert all(s.options.shared_pool for s in r.sessions)
    p = r.run(np.zeros((2, 1, 8, 8), np.float32)).probs
    assert p.shape[0] == 2 and np.allclose(p.sum(1), 1)
    with Runner({str(src)!r}, threads=2) as plain:  # the same answers as sessions with pools of their own?
        raise SystemExit("a per-session pool opened beside the shared one")
"""
    res = _in_fresh_process(code)
    assert res.returncode != 0
    assert "shared pool of 2 thread(s)" in res.stderr and "shared_pool=True" in res.stderr, res.stderr
    same = f"""
import numpy as np
from kdedge.runtime import Runner
x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
with Runner({str(src)!r}, threads=2, shared_pool=True) as r:
    a = r.run(x).probs
    try:
        Runner({str(src)!r}, threads=1, shared_pool=True)
    except ValueError as e:
        print("refused:", e)
np.save({str(tmp_path / 'shared.npy')!r}, a)
"""
    res = _in_fresh_process(same)
    assert res.returncode == 0, res.stderr
    assert "refused: this process's shared onnxruntime pool has 2 thread(s), asked for 1" in res.stdout
    with Runner(src, threads=2) as plain:
        x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(np.load(tmp_path / "shared.npy"), plain.run(x).probs, atol=1e-6)
        assert plain.run_key == ""


def test_shared_pool_is_an_onnxruntime_setting_only(tmp_path: Path) -> None:
    from kdedge.bundle.profile.store import _run_flags

    assert _run_flags("shared") == " --shared-pool"
    assert _run_flags("onnx-cuda-shared-rtfifo50") == " --device cuda --shared-pool --realtime --rt-priority 50"
    from kdedge.runtime.runner import _session_options
    from kdedge.targets.base import CompileSpec
    from kdedge.targets.build import build_bundle

    out = shutil.copytree(toy_bundle(tmp_path)[0], tmp_path / "fake.kdedge")
    build_bundle(out, "fake", CompileSpec(max_batch=4))
    with pytest.raises(ValueError, match="the fake target has none"):
        Runner(out, target="fake", shared_pool=True)
    assert _session_options(open_bundle(out), "onnx", None, None, False, 2, "all", None, True)[1] == "shared"
