"""The online load estimate (kdedge.runtime.online) and the deadline policy that plans with it,
on fake sessions whose latencies the test sets: a device that gets busy, then quiet again."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_runtime import FakeClock, fake_factory, toy_bundle

from kdedge.runtime import Deadline, Runner, open_bundle
from kdedge.runtime.online import LoadEstimate
from kdedge.runtime.policies import AllOf, Confidence, make_policy

QUIET = {"stage0": 1.0, "stage1": 1.0, "stage2": 1.0, "prefix0": 1.0, "prefix1": 2.0, "prefix2": 3.0}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return open_bundle(toy_bundle(tmp_path_factory.mktemp("bundles"))[0])


def _runner(bundle):
    clock, log, made = FakeClock(), [], {}
    r = Runner(bundle, session_factory=fake_factory(clock, dict(QUIET), {n: np.zeros(10) for n in QUIET}, log, made),
               clock=clock, watchdog=False)
    return r, made


def _set(made, factor: float) -> None:
    for name, s in made.items():
        s.latency_ms = QUIET[name] * factor


def _x() -> np.ndarray:
    return np.zeros((1, 1, 8, 8), np.float32)


def test_estimate_is_the_recent_maximum_ratio() -> None:
    e = LoadEstimate(window=3)
    assert e.factor() == 1.0
    e.observe(0.5, 1.0)
    assert e.factor() == 1.0  # faster than planned never lowers the plan below the profile
    for m, f in [(4.0, 4.0), (1.0, 4.0), (1.0, 4.0), (1.0, 1.0), (3.0, 3.0), (2.0, 3.0)]:
        e.observe(m, 1.0)
        assert e.factor() == f
    e.observe(1e9, 1.0)
    assert e.factor() == e.clip  # one stall of seconds is bounded
    e.observe(float("nan"), 1.0)
    e.observe(1.0, 0.0)  # refused: nothing planned
    assert e.factor() == e.clip
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="online window"):
            LoadEstimate(window=bad)


@pytest.mark.parametrize("online", [False, 4])
def test_busy_then_quiet(bundle, online) -> None:
    """Deadline 3.5 ms, stages planned at 1 ms each. Quiet: all three run. Busy (every stage 2x):
    planning with the profile alone runs stage 1 and misses; with the online estimate stage 0's
    own time already says the device is slow, stage 1 is skipped and the deadline holds. Quiet
    again: back to all three once the slow observations left the window."""
    r, made = _runner(bundle)
    pol = Deadline(3.5, margin_ms=0.0, latencies_ms=[1.0, 1.0, 1.0], watchdog=False, online=online)
    res = r.run(_x(), pol)
    assert res.stage.tolist() == [2] and res.budget_met.all()
    _set(made, 2.0)
    busy = [r.run(_x(), pol) for _ in range(3)]
    if online:
        assert [b.stage.tolist() for b in busy] == [[0]] * 3 and all(b.budget_met.all() for b in busy)
    else:
        assert [b.stage.tolist() for b in busy] == [[1]] * 3 and not any(b.budget_met.all() for b in busy)
    _set(made, 1.0)
    quiet = [int(r.run(_x(), pol).stage[0]) for _ in range(6)]
    if online:
        # the three slow observations (stage 0 of each busy request) leave a window of 4 as quick
        # stages run: one stage short in the first quiet request, all three from the second on
        assert quiet == [1, 2, 2, 2, 2, 2]
    else:
        assert quiet == [2] * 6


def test_fused_budget_mode_plans_with_the_estimate(bundle) -> None:
    r, made = _runner(bundle)
    pol = Deadline(3.5, margin_ms=0.0, latencies_ms=[1.0] * 3, prefix_latencies_ms=[1.0, 2.0, 3.0], fused=True,
                   watchdog=False, online=4)
    assert r.run(_x(), pol).graphs == ("prefix2",)
    _set(made, 2.0)
    assert r.run(_x(), pol).graphs == ("prefix2",)   # not known yet: runs 6 ms, a miss
    assert r.run(_x(), pol).graphs == ("prefix0",)   # 3 ms x 2 > 3.5; 1 ms x 2 fits


def test_online_through_all_of_and_make_policy(bundle) -> None:
    r, made = _runner(bundle)
    dl = Deadline(3.5, margin_ms=0.0, latencies_ms=[1.0] * 3, watchdog=False, online=4)
    pol = AllOf(dl, Confidence(1.0))
    _set(made, 2.0)
    r.run(_x(), pol)
    assert dl.load is not None and dl.load.factor() == pytest.approx(2.0)
    assert make_policy(deadline_ms=2, online=True).load.window == 32
    assert make_policy(deadline_ms=2).load is None and "online" in make_policy(deadline_ms=2, online=8).name


def test_the_profile_path_feeds_the_estimate(bundle, tmp_path) -> None:
    """Without explicit latencies the expected time is the profile's statistic."""
    from kdedge.profile.latency import LatencyProfile, bundle_fingerprint, current_key

    device, setting, detail = current_key(1)
    graphs = {g: {"1": {"latency_ms": {"min": v, "mean": v, "median": v, "p90": v, "p95": v, "p99": v, "max": v,
                                       "n": 10}}} for g, v in {**QUIET, "chain": 3.0}.items()}
    prof = LatencyProfile({"format": "kdedge-profile", "version": 1, "device": device, "setting": setting,
                           "setting_detail": detail, "target": "onnx", "run_key": "", "threads": 1,
                           "bundle": {"fingerprint": bundle_fingerprint(bundle, "onnx"), "family": bundle.family},
                           "runs": 10, "warmup": 0, "batches": [1], "graphs": graphs})
    clock, log, made = FakeClock(), [], {}
    r = Runner(bundle, session_factory=fake_factory(clock, dict(QUIET), {n: np.zeros(10) for n in QUIET}, log, made),
               clock=clock, watchdog=False, threads=1, profile=prof)
    pol = Deadline(3.5, margin_ms=0.0, watchdog=False, online=4)
    assert r.run(_x(), pol).stage.tolist() == [2]
    _set(made, 3.0)
    assert r.run(_x(), pol).stage.tolist() == [0]
    assert pol.load is not None and pol.load.factor() == pytest.approx(3.0)


def test_the_rank_th_largest_ratio_ignores_a_lone_stall() -> None:
    from kdedge.runtime.online import LoadEstimate

    est = LoadEstimate(window=8, rank=2)
    for r in (1.0, 1.0, 50.0, 1.2, 1.0):  # one stage preempted: 50x
        est.observe(r, 1.0)
    assert est.factor() == 1.2
    est.observe(3.0, 1.0)  # a second slow stage: the device is busy
    assert est.factor() == 3.0
    for _ in range(8):
        est.observe(1.0, 1.0)
    assert est.factor() == 1.0
    with pytest.raises(ValueError, match="rank must be an integer from 1 to the window"):
        LoadEstimate(window=4, rank=5)
