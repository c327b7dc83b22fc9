"""Policy decisions on controlled latencies: fake sessions on a fake clock (deterministic), plus
one generous wall-clock test of the watchdog aborting a real onnxruntime stage."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from helpers_runtime import FakeClock, fake_factory, toy_bundle

from kdedge.profile.latency import LatencyProfile, bundle_fingerprint, current_key
from kdedge.runtime import (
    CONTINUE,
    STOP,
    AllOf,
    Confidence,
    Deadline,
    Decision,
    Fixed,
    Full,
    Runner,
    combine,
    make_policy,
    open_bundle,
)
from kdedge.runtime.policies import Energy, confidence_of
from kdedge.runtime.watchdog import Watchdog
from kdedge.targets.ort_session import OrtOptions, OrtSession, open_ort_session
from kdedge.targets.session import StageAborted

LAT = {"stage0": 1.0, "stage1": 2.0, "stage2": 3.0, "prefix0": 0.5, "prefix1": 1.5, "prefix2": 2.5}
K = 10


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return open_bundle(toy_bundle(tmp_path_factory.mktemp("bundles"))[0])


def confident(cls: int, sure: bool) -> np.ndarray:
    """Per-member logits whose softmax has max probability ~0.99 (sure) or ~0.25 (not)."""
    z = np.zeros(K)
    z[cls] = 7.0 if sure else 1.0
    return z


def make(bundle, logits=None, lat=None, combine_rule=None, **kw):
    clock, log, made = FakeClock(), [], {}
    logits = logits or {name: confident(0, False) for name in LAT}
    r = Runner(bundle, session_factory=fake_factory(clock, lat or LAT, logits, log, made), clock=clock,
               watchdog=False, combine=combine_rule, **kw)
    return r, clock, log, made


def ids(n: int) -> np.ndarray:
    """A batch whose sample i carries id i (read back by the fake sessions)."""
    x = np.zeros((n, 1, 8, 8), np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def test_full_runs_every_stage_with_fake_times(bundle) -> None:
    r, clock, log, _ = make(bundle)
    res = r.run(ids(2))
    assert log == ["stage0", "stage1", "stage2"]
    assert res.stage_ms == pytest.approx((1.0, 2.0, 3.0)) and res.total_ms.tolist() == pytest.approx([6.0, 6.0])
    assert res.budget_met.all() and res.policy == "full"


def test_fixed_uses_the_fused_prefix_or_the_stages(bundle) -> None:
    r, clock, log, made = make(bundle)
    assert "prefix1" not in made  # prefix sessions open on first use
    res = r.run(ids(3), Fixed(2))
    assert log == ["prefix1"] and res.graphs == ("prefix1",) and res.stage.tolist() == [1, 1, 1]
    assert res.members.tolist() == [3, 3, 3] and res.total_ms[0] == pytest.approx(1.5)
    log.clear()
    res = r.run(ids(3), Fixed(2, fused=False))
    assert log == ["stage0", "stage1"] and res.total_ms[0] == pytest.approx(3.0)


@pytest.mark.parametrize("deadline, stage, total, met", [
    (10.0, 2, 6.0, True),    # 1 + 2 + 3 fits
    (5.0, 1, 3.0, True),     # before stage 2: 2 ms left < 3 + 0.1
    (3.05, 0, 1.0, True),    # before stage 1: 2.05 ms left < 2 + 0.1
    (3.2, 1, 3.0, True),     # 2.2 ms left >= 2 + 0.1
    (0.5, 0, 1.0, False),    # shorter than stage 0: stage 0's answer, marked as a miss
])
def test_deadline_continues_only_while_the_next_stage_fits(bundle, deadline, stage, total, met) -> None:
    r, clock, log, _ = make(bundle)
    res = r.run(ids(2), Deadline(deadline, margin_ms=0.1, latencies_ms=[1.0, 2.0, 3.0]))
    assert res.stage.tolist() == [stage, stage]
    assert res.total_ms[0] == pytest.approx(total)
    assert res.budget_met.tolist() == [met, met] and res.budget_ms == deadline
    assert log == [f"stage{k}" for k in range(stage + 1)]


@pytest.mark.parametrize("deadline, graphs, stage, total, met", [
    (10.0, ("prefix2",), 2, 2.5, True),
    (2.0, ("prefix1",), 1, 1.5, True),                # 1.5 + 0.1 fits, 2.5 + 0.1 does not
    (0.7, ("prefix0",), 0, 0.5, True),
    (0.3, ("stage0",), 0, 1.0, False),                # no prefix fits: the stages, stage 0 late
])
def test_deadline_in_budget_mode_picks_the_deepest_fused_prefix(bundle, deadline, graphs, stage, total, met) -> None:
    r, clock, log, _ = make(bundle)
    pol = Deadline(deadline, margin_ms=0.1, latencies_ms=[1.0, 2.0, 3.0], prefix_latencies_ms=[0.5, 1.5, 2.5],
                   fused=True)
    assert not pol.needs_profile and pol.name.endswith("-fused")
    res = r.run(ids(2), pol)
    assert res.graphs == graphs and res.stage.tolist() == [stage] * 2
    assert res.total_ms[0] == pytest.approx(total) and res.budget_met.tolist() == [met] * 2
    assert Deadline(5.0, latencies_ms=[1, 2, 3], fused=True).needs_profile  # prefix latencies from the profile


def test_deadline_counts_from_the_request_start(bundle) -> None:
    r, clock, log, _ = make(bundle)
    res = r.run(ids(1), Deadline(5.0, latencies_ms=[1.0, 2.0, 3.0]), start=clock() - 2.5e-3)
    assert res.stage.tolist() == [0] and res.total_ms[0] == pytest.approx(3.5)  # 2.5 queued + stage 0


def profile_for(bundle, stats: dict[str, dict[str, float]], device=None, setting=None) -> LatencyProfile:
    dev, sett, _ = current_key(1)
    graphs = {g: {"1": {"latency_ms": {**{k: v for k, v in s.items()}, "n": 100}}} for g, s in stats.items()}
    return LatencyProfile({"format": "kdedge-profile", "version": 1, "device": device or dev,
                           "setting": setting or sett, "target": "onnx", "threads": 1,
                           "bundle": {"fingerprint": bundle_fingerprint(bundle, "onnx")}, "batches": [1],
                           "graphs": graphs})


def _stats(median: float, p99: float) -> dict[str, float]:
    return {"min": median, "mean": median, "median": median, "p90": p99, "p95": p99, "p99": p99, "max": p99}


def test_deadline_reads_the_profile_statistic(bundle) -> None:
    prof = profile_for(bundle, {"stage0": _stats(1, 1.5), "stage1": _stats(2, 4), "stage2": _stats(3, 5)})
    r, clock, log, _ = make(bundle, profile=prof, threads=1)
    assert r.run(ids(1), Deadline(6.5)).stage.tolist() == [1]             # p99: 1 + 4 + 0.1 fits, + 5 not
    assert r.run(ids(1), Deadline(6.5, stat="median")).stage.tolist() == [2]  # median: 1 + 2 + 3 fits
    assert r.run(ids(1), Deadline(4.0)).stage.tolist() == [0]             # 4.1 > 3 ms left


def test_deadline_refuses_a_profile_lookup_that_is_not_finite(bundle) -> None:
    """A NaN latency would make ``latency + margin > left`` False and run every stage: the
    lookup is refused instead (profiles are validated when built, this guards later edits)."""
    prof = profile_for(bundle, {"stage0": _stats(1, 1.5), "stage1": _stats(2, 4), "stage2": _stats(3, 5)})
    prof.data["graphs"]["stage1"]["1"]["latency_ms"]["p99"] = float("nan")
    r, *_ = make(bundle, profile=prof, threads=1)
    with pytest.raises(ValueError, match="stage1 at batch 1 a p99 latency_ms of nan"):
        r.run(ids(1), Deadline(6.5))
    with pytest.raises(ValueError, match="stage1 batch 1 p99 must be a finite number > 0"):
        LatencyProfile(prof.data)


def test_deadline_without_a_profile_says_to_profile(bundle) -> None:
    r, *_ = make(bundle, profile=None, threads=1)
    with pytest.raises(ValueError, match="kdedge profile"):
        r.run(ids(1), Deadline(5.0))
    r.run(ids(1), Deadline(5.0, latencies_ms=[1, 2, 3]))  # explicit latencies need no profile


def test_watchdog_abort_returns_the_previous_answer(bundle) -> None:
    # stage 1 claims 1 ms but takes 50: the handle's deadline (10 - 0.1) stops it
    logits = {name: confident(3 if name == "stage0" else 5, True) for name in LAT}
    r, clock, log, _ = make(bundle, logits=logits, lat={**LAT, "stage1": 50.0})
    res = r.run(ids(2), Deadline(10.0, latencies_ms=[1.0, 1.0, 1.0]))
    assert res.aborted == "stage1" and res.graphs == ("stage0", "stage1")
    assert res.stage.tolist() == [0, 0] and res.labels.tolist() == [3, 3]  # stage 0's answer
    assert res.total_ms[0] == pytest.approx(9.9) and res.budget_met.all()
    assert res[0].stage_ms == (pytest.approx(1.0),)
    # without the watchdog (or for a stage predicted below watchdog_min_ms) the stage runs over
    # and the answer is late
    for pol in (Deadline(10.0, latencies_ms=[1.0, 1.0, 1.0], watchdog=False),
                Deadline(10.0, latencies_ms=[1.0, 1.0, 1.0], watchdog_min_ms=1.5)):
        res = r.run(ids(2), pol)
        assert res.aborted is None and res.stage.tolist() == [1, 1] and not res.budget_met.any()


@pytest.mark.parametrize("rule", ["last", "mean_logits", "mean_probs"])
def test_confidence_lets_done_samples_leave_the_batch(bundle, rule: str) -> None:
    # sample 0, 1 sure after stage 0; sample 2 sure after stage 1 (rule "last"); sample 3 never
    s0 = np.stack([confident(1, True), confident(2, True), confident(4, False), confident(6, False)])
    s1 = np.stack([confident(9, True), confident(9, True), confident(4, True), confident(6, False)])
    s2 = np.stack([confident(8, False)] * 4)
    r, clock, log, made = make(bundle, logits={**{n: confident(0, False) for n in LAT},
                                               "stage0": s0, "stage1": s1, "stage2": s2}, combine_rule=rule)
    res = r.run(ids(4), Confidence(0.9))
    # the sessions saw the shrinking batch, and the carried ids followed the right samples
    assert made["stage0"].batches == [4]
    per_stage = [[s0], [s0, s1], [s0, s1, s2]]
    members = [1, 2, 1]
    expect_stage = []
    for i in range(4):
        for k in range(3):
            p = combine(rule, [m[i: i + 1] * mm for m, mm in zip(per_stage[k], members)], members[: k + 1])
            if p.max() >= 0.9 or k == 2:
                expect_stage.append(k)
                np.testing.assert_allclose(res.probs[i], p[0], atol=1e-6)
                break
    assert res.stage.tolist() == expect_stage
    assert expect_stage[:2] == [0, 0] and expect_stage[3] == 2
    assert made["stage1"].batches == [2] and made["stage2"].batches == [sum(s == 2 for s in expect_stage)]
    cum = {0: 1.0, 1: 3.0, 2: 6.0}
    assert res.total_ms.tolist() == pytest.approx([cum[s] for s in expect_stage])
    assert res.members.tolist() == [[1, 3, 4][s] for s in expect_stage]


def test_confidence_per_exit_thresholds_and_margin(bundle) -> None:
    s0 = np.stack([confident(1, True), confident(2, True)])
    r, clock, log, made = make(bundle, logits={**{n: confident(0, False) for n in LAT}, "stage0": s0},
                               combine_rule="last")
    assert r.run(ids(2), Confidence([1.0, 0.0])).stage.tolist() == [1, 1]   # exit 0 never, exit 1 always
    assert r.run(ids(2), Confidence([0.5, 0.0, 0.0])).stage.tolist() == [0, 0]
    tie = np.zeros(K)
    tie[[1, 2]] = 7.0  # two classes at ~0.5 each: confident by max probability, not by margin
    r2, *_ = make(bundle, logits={**{n: confident(0, False) for n in LAT}, "stage0": tie}, combine_rule="last")
    assert r2.run(ids(2), Confidence(0.4)).stage.tolist() == [0, 0]
    assert r2.run(ids(2), Confidence(0.4, measure="margin")).stage.tolist() == [2, 2]
    with pytest.raises(ValueError, match="thresholds for 3 stages"):
        r.run(ids(2), Confidence([0.5]))
    p = np.array([[0.6, 0.3, 0.1]])
    assert confidence_of(p, "max")[0] == pytest.approx(0.6) and confidence_of(p, "margin")[0] == pytest.approx(0.3)


def test_all_of_deadline_and_confidence(bundle) -> None:
    s0 = np.stack([confident(1, True), confident(2, False)])
    r, clock, log, made = make(bundle, logits={**{n: confident(0, False) for n in LAT}, "stage0": s0},
                               combine_rule="last")
    pol = AllOf(Deadline(5.0, latencies_ms=[1, 2, 3]), Confidence(0.9))
    assert pol.budget_ms == 5.0 and pol.name == "deadline-5ms+confidence-max-0.9"
    res = r.run(ids(2), pol)
    assert res.stage.tolist() == [0, 1] and res.budget_met.all()  # sample 0 confident; sample 1 out of time


def test_user_policy_and_bad_decisions(bundle) -> None:
    class FirstTwo:
        name, budget_ms, needs_profile = "first-two", None, False

        def decide(self, ctx):
            assert ctx.num_stages == 3 and ctx.prefixes == 3 and ctx.batch == 2
            if ctx.stage == 0:
                assert ctx.probs is None and ctx.members == 0
            else:
                assert ctx.probs.shape == (2, K) and ctx.members == [0, 1, 3][ctx.stage]
            return CONTINUE if ctx.stage < 2 else STOP

    r, clock, log, _ = make(bundle)
    res = r.run(ids(2), FirstTwo())
    assert res.stage.tolist() == [1, 1] and res.policy == "first-two"

    class BadMask(FirstTwo):
        def decide(self, ctx):
            return Decision(np.array([True])) if ctx.stage else CONTINUE

    with pytest.raises(ValueError, match="mask of shape"):
        r.run(ids(2), BadMask())

    class StopAtOnce(FirstTwo):
        def decide(self, ctx):
            return STOP

    assert r.run(ids(2), StopAtOnce()).stage.tolist() == [0, 0]  # stage 0 always runs


@pytest.mark.parametrize("make_bad, needle", [
    (lambda: Deadline(0), "positive number"),
    (lambda: Deadline(5, margin_ms=-1), "margin"),
    (lambda: Deadline(5, stat="p42"), "unknown latency statistic"),
    (lambda: Deadline(5, watchdog_min_ms=-1), "watchdog_min_ms"),
    (lambda: Confidence(-0.1), ">= 0"),
    (lambda: Confidence(0.5, measure="entropy"), "unknown confidence measure"),
    (lambda: Confidence(90), "probabilities from 0 to 1.*write 0.9"),       # a percentage: never reached
    (lambda: Confidence([0.5, 1.5]), "probabilities from 0 to 1"),          # only NEVER may close an exit
    (lambda: Deadline(5, latencies_ms=[1, float("nan"), 1]), r"latencies_ms\[1\] must be a finite number"),
    (lambda: Energy(5, energies_mj=[1, -1, 1]), r"energies_mj\[1\] must be a finite number"),
    (lambda: Fixed(0), "at least 1 stage"),
    (lambda: AllOf(), "at least one policy"),
    (lambda: make_policy(stages=2, deadline_ms=3), "cannot be combined"),
    (lambda: make_policy(deadline_ms=3, confidence=0.9, fused=True), "cannot be combined"),
])
def test_bad_policy_arguments(make_bad, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_bad()


def test_make_policy() -> None:
    assert isinstance(make_policy(), Full)
    assert isinstance(make_policy(stages=2), Fixed)
    assert isinstance(make_policy(deadline_ms=2), Deadline)
    assert isinstance(make_policy(deadline_ms=2, confidence=0.9), AllOf)
    assert make_policy(stages=2).fused and not make_policy(stages=2, fused=False).fused
    assert not make_policy(deadline_ms=2).fused and make_policy(deadline_ms=2, fused=True).fused


# ---------------------------------------------------------------------------------------------
# the real watchdog on onnxruntime: a stage that would never end unless aborted, so that the
# tests assert the abort itself, not a ratio of times that a busy machine could upset


def endless_stage1(path: Path, d: int = 64) -> Path:
    """A graph with the toy's stage1 interface that runs for ever: a Loop of 10^18 d x d MatMuls.
    onnxruntime checks ``RunOptions.terminate`` inside the loop, so only an abort ends it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((d, 10)).astype(np.float32) * 0.01, "head"),
             numpy_helper.from_array(np.ones((1, d), np.float32), "row"),
             numpy_helper.from_array(np.array(10**18, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "cond")]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["h_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [None, d])])
    n = [helper.make_node("Flatten", ["stage0__f0"], ["flat"]),
         helper.make_node("ReduceMean", ["flat"], ["m"], keepdims=1),   # [N, 1]
         helper.make_node("Mul", ["m", "row"], ["h0"]),                  # [N, d]
         helper.make_node("Loop", ["trips", "cond", "h0"], ["h"], body=body),
         helper.make_node("MatMul", ["h", "head"], ["stage1__logits"]),
         helper.make_node("Identity", ["stage0__f0"], ["stage1__f1"])]
    g = helper.make_graph(n, "endless", [helper.make_tensor_value_info("stage0__f0", TensorProto.FLOAT, [None, 8, 8, 8])],
                          [helper.make_tensor_value_info("stage1__logits", TensorProto.FLOAT, [None, 10]),
                           helper.make_tensor_value_info("stage1__f1", TensorProto.FLOAT, [None, 8, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    return path


def _bounded(fn, seconds: float = 120.0, on_hang=None):
    """Run ``fn`` in a thread; a hang (the abort never came) fails the test instead of blocking it."""
    import threading

    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if on_hang is not None:
            on_hang()
        pytest.fail(f"the stage was not aborted within {seconds:.0f} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def test_real_watchdog_aborts_an_overrunning_onnxruntime_stage(bundle, tmp_path: Path) -> None:
    heavy = OrtSession(endless_stage1(tmp_path / "endless.onnx"), ["stage0__f0"], ["stage1__logits", "stage1__f1"],
                       name="stage1", options=OrtOptions(threads=1))
    f0 = np.zeros((1, 8, 8, 8), np.float32)

    # the session alone, aborted by the watchdog 10 ms after it starts
    dog = Watchdog()
    handle = heavy.abort_handle()
    token = dog.arm(time.perf_counter() + 0.01, handle)

    def alone() -> None:
        with pytest.raises(StageAborted):
            heavy.run({"stage0__f0": f0}, handle)

    _bounded(alone, on_hang=handle.abort)
    assert handle.aborted
    Watchdog.disarm(token)
    dog.close()

    # inside the runner: stage 1 claims 0.01 ms, overruns, is aborted; stage 0's answer comes back
    def factory(b, entry, options):
        return heavy if entry.name == "stage1" else open_ort_session(b, entry, OrtOptions(threads=1))

    with Runner(bundle, session_factory=factory, threads=1) as r:
        x = np.zeros((1, 1, 8, 8), np.float32)
        ref = r.run(x, Fixed(1, fused=False))
        res = _bounded(lambda: r.run(x, Deadline(20.0, latencies_ms=[0.01, 0.01, 0.01], margin_ms=0.1,
                                                  watchdog_min_ms=0)))
        assert res.aborted == "stage1" and res.stage.tolist() == [0]
        assert res.graphs == ("stage0", "stage1") and len(res.stage_ms) == 2
        np.testing.assert_allclose(res.probs, ref.probs)


def test_watchdog_fires_in_order_and_skips_disarmed() -> None:
    """On a clock the test moves: nothing fires before the clock passes a deadline, however slowly
    the watchdog's thread is scheduled, and then every armed handle fires in deadline order."""
    from kdedge.targets.session import AbortHandle

    now = [0.0]
    fired: list[str] = []
    dog = Watchdog(clock=lambda: now[0])
    handles = {name: AbortHandle(lambda n=name: fired.append(n)) for name in ("a", "b", "c")}
    dog.arm(0.003, handles["c"])
    dog.arm(0.001, handles["a"])
    token_b = dog.arm(0.002, handles["b"])
    Watchdog.disarm(token_b)
    time.sleep(0.02)  # the thread has waited its (real) delay several times and re-read the clock
    assert fired == []
    now[0] = 10.0
    give_up = time.perf_counter() + 60.0
    while len(fired) < 2 and time.perf_counter() < give_up:
        time.sleep(0.005)
    dog.close()
    assert fired == ["a", "c"] and not handles["b"].aborted


def test_deadline_policy_from_several_threads(bundle) -> None:
    import threading

    with Runner(bundle, threads=1) as r:
        x = np.zeros((2, 1, 8, 8), np.float32)
        pol = Deadline(10_000.0, latencies_ms=[0.01, 0.01, 0.01], watchdog_min_ms=0)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(50):
                    res = r.run(x, pol)
                    assert res.stage.tolist() == [2, 2] and res.aborted is None and res.budget_met.all()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert r._watchdog is not None  # the watchdog armed and disarmed every stage
