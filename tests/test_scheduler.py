"""The request scheduler alone, deterministic: fake sessions whose latency grows with the batch
run on a fake clock, and the tests drive ``Scheduler.step`` by hand (one threaded test checks the
worker and shutdown)."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any, Mapping

import numpy as np
import pytest

from helpers_runtime import FakeClock, toy_bundle
from kdedge.runtime import InputError, Runner, open_bundle
from kdedge.runtime.costs import _interpolate
from kdedge.runtime.online import LoadEstimate
from kdedge.runtime.scheduler import CLOSED, FAILED, OK, QUEUE_FULL, SHED, Answer, Costs, Scheduler
from kdedge.runtime.tickets import RANKED, rank, rank_lists, rank_row

K = 10
# per-stage latency (ms) at batch 1 and per extra sample: stage k at batch n takes base + slope * (n - 1)
BASE = {"stage0": 1.0, "stage1": 2.0, "stage2": 3.0, "prefix0": 0.9, "prefix1": 2.7, "prefix2": 5.4}
SLOPE = 0.1


def latency(graph: str, n: int) -> float:
    return BASE[graph] + SLOPE * (n - 1)


class BatchSession:
    """A stage that takes ``latency(graph, n)`` on the fake clock for a batch of n and returns, for
    sample id i (``x[i, 0, 0, 0]``, copied into the carried tensors), logits favouring class
    ``i % K``; ids in ``nan_ids`` get NaN logits. ``slow`` multiplies the time taken."""

    can_abort = False
    can_bind = False

    def __init__(self, entry: Any, clock: FakeClock, log: list[tuple[str, int]], nan_ids: set[int], slow: list[float],
                 hooks: dict[str, Any]):
        self.entry, self.clock, self.log, self.nan_ids, self.slow = entry, clock, log, nan_ids, slow
        self.hooks = hooks
        self.first = entry.inputs[0].tensor

    def run(self, inputs: Mapping[str, np.ndarray], abort: Any = None) -> dict[str, np.ndarray]:
        x = inputs[self.first]
        n = len(x)
        ids = x.reshape(n, -1)[:, 0].astype(np.int64)
        self.log.append((self.entry.name, n))
        self.clock.advance_ms(latency(self.entry.name, n) * self.slow[0])
        hook = self.hooks.pop(self.entry.name, None)  # e.g. requests that arrive while this stage runs
        if hook is not None:
            hook()
        out = {}
        for o in self.entry.outputs:
            if o.tensor == self.entry.logits_tensor:
                z = np.zeros((n, K), np.float32)
                z[np.arange(n), ids % K] = 4.0 * self.entry.members
                z[np.isin(ids, list(self.nan_ids))] = np.nan
                out[o.tensor] = z
            else:
                carried = np.zeros((n, *o.shape[1:]), np.float32)
                carried.reshape(n, -1)[:, 0] = ids
                out[o.tensor] = carried
        return out

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return open_bundle(toy_bundle(tmp_path_factory.mktemp("bundles"))[0])


class Rig:
    def __init__(self, bundle: Any, nan_ids: set[int] | None = None, **kw: Any) -> None:
        self.clock = FakeClock()
        self.log: list[tuple[str, int]] = []
        self.slow = [1.0]
        self.hooks: dict[str, Any] = {}
        factory = lambda b, e, o: BatchSession(e, self.clock, self.log, nan_ids or set(), self.slow,  # noqa: E731
                                               self.hooks)
        self.runner = Runner(bundle, session_factory=factory, clock=self.clock, watchdog=False, profile=None)
        kw.setdefault("max_batch", 4)
        kw.setdefault("margin_ms", 0.5)
        kw.setdefault("online", 0)
        kw.setdefault("costs", Costs.from_function(latency, list(BASE), kw["max_batch"]))
        self.sched = Scheduler(self.runner, clock=self.clock, start=False, warmup=False, **kw)
        self._next = 0

    def sample(self) -> np.ndarray:
        x = np.zeros((1, 1, 8, 8), np.float32)
        x[0, 0, 0, 0] = self._next
        self._next += 1
        return x

    def submit(self, n: int, deadline_ms: float | None = None) -> list[Any]:
        return [self.sched.submit(self.sample(), deadline_ms) for _ in range(n)]

    def drain(self) -> int:
        steps = 0
        while self.sched.step():
            steps += 1
        return steps


def answers(tickets: list[Any]) -> list[Answer]:
    return [t.result(0) for t in tickets]


def test_one_request_alone_runs_every_stage_that_fits(bundle) -> None:
    rig = Rig(bundle)
    (t,) = rig.submit(1, deadline_ms=100)
    rig.clock.advance_ms(2.0)  # it waited 2 ms before the worker took it
    assert rig.sched.step() == 1
    a = t.result(0)
    assert a.status == OK and a.stage == 2 and a.members == 4 and a.budget_met and a.batch == 1
    assert a.queue_ms == pytest.approx(2.0) and a.compute_ms == pytest.approx(6.0) and a.total_ms == pytest.approx(8.0)
    assert a.label == 0 and a.class_name == "0" and a.probs.shape == (K,) and a.probs.sum() == pytest.approx(1)
    assert [g for g, _ in rig.log] == ["stage0", "stage1", "stage2"]


@pytest.mark.parametrize("deadline, stage", [(100.0, 2), (6.4, 1), (3.6, 1), (3.4, 0), (0.5, 0)])
def test_depth_follows_the_deadline(bundle, deadline: float, stage: int) -> None:
    rig = Rig(bundle)
    (t,) = rig.submit(1, deadline_ms=100.0 if deadline == 0.5 else deadline)
    if deadline == 0.5:  # shorter than stage 0: admitted under a long deadline, then it is late anyway
        rig.clock.advance_ms(99.8)
    rig.sched.step()
    a = t.result(0)
    assert a.status == OK and a.stage == stage
    assert a.budget_met == (deadline != 0.5)


def test_requests_are_batched_and_samples_leave_at_their_own_depth(bundle) -> None:
    rig = Rig(bundle)
    # in one batch of 4 (costs at batch 4: 1.3, 2.3, 3.3; then 2 samples left: 3.1): deadlines that
    # allow stage 0 only, stage 1, and every stage
    tickets = [rig.sched.submit(rig.sample(), d) for d in (2.0, 4.5, 20.0, 20.0)]
    assert rig.sched.step() == 4
    a = answers(tickets)
    assert [x.stage for x in a] == [0, 1, 2, 2] and all(x.batch == 4 for x in a) and all(x.budget_met for x in a)
    # each is answered when it leaves, not when the batch ends
    assert [x.compute_ms for x in a] == pytest.approx([1.3, 1.3 + 2.2, 1.3 + 2.2 + 3.1, 1.3 + 2.2 + 3.1])
    assert rig.log == [("stage0", 4), ("stage1", 3), ("stage2", 2)]
    assert [x.label for x in a] == [0, 1, 2, 3]


def test_earliest_deadline_first(bundle) -> None:
    rig = Rig(bundle, max_batch=2)
    late = rig.submit(2, deadline_ms=50)
    soon = rig.submit(2, deadline_ms=20)
    rig.sched.step()
    assert all(t.done() for t in soon) and not any(t.done() for t in late)


def test_backlog_makes_batches_shallower_and_nothing_misses(bundle) -> None:
    # 8 requests at once, batches of 4 (batch-4 costs 1.3 / 2.3 / 3.3 ms). Alone, the first batch
    # would run every stage (6.9 ms) and leave the second only stage 1 by the deadline.
    rig = Rig(bundle)
    tickets = rig.submit(8, deadline_ms=11.2)
    assert rig.drain() == 2
    a = answers(tickets)
    assert all(x.status == OK and x.budget_met for x in a)
    # the first batch stops where the queue can still reach its own depth (stage 2 would leave the
    # queue stage 1 only); the second, with nothing behind it, goes deeper
    assert [x.stage for x in a] == [1] * 4 + [2] * 4


def test_the_running_batch_goes_on_when_the_queue_could_not_go_deeper_anyway(bundle) -> None:
    # a batch of 2 (long deadline) runs; while its stage 0 runs, 4 requests arrive whose deadline
    # leaves them stage 0 only, whether the batch stops or not: the batch runs stage 1 (it still
    # leaves them stage 0 in time), not stage 2 (which would not)
    rig = Rig(bundle)
    first = rig.submit(2, deadline_ms=30.0)
    queued: list[Any] = []
    rig.hooks["stage0"] = lambda: queued.extend(rig.submit(4, deadline_ms=4.0))
    rig.drain()
    assert [x.stage for x in answers(first)] == [1, 1] and [x.stage for x in answers(queued)] == [0] * 4
    assert all(x.budget_met for x in answers(first) + answers(queued))
    assert rig.log == [("stage0", 2), ("stage1", 2), ("stage0", 4)]


def test_no_stage_runs_longer_than_a_new_request_could_wait(bundle) -> None:
    # default deadline 4.5 ms: a request arriving as a stage starts needs stage 0 of a full batch
    # (1.3 ms) and the 0.5 ms margin after it, so no stage may take more than 2.7 ms
    rig = Rig(bundle, deadline_ms=4.5)
    (t,) = rig.submit(1, deadline_ms=100.0)  # its own deadline would allow every stage
    rig.sched.step()
    assert t.result(0).stage == 1 and [g for g, _ in rig.log] == ["stage0", "stage1"]  # stage 2 takes 3 ms
    free = Rig(bundle)  # no default deadline: nothing to keep room for
    (t,) = free.submit(1, deadline_ms=100.0)
    free.sched.step()
    assert t.result(0).stage == 2


def test_overload_sheds_at_once_only_what_cannot_get_stage_0(bundle) -> None:
    rig = Rig(bundle)
    # stage 0 of batches of 4 takes 1.3 ms: with a 3.2 ms deadline and 0.5 ms margin, two batches fit
    tickets = rig.submit(12, deadline_ms=3.2)
    shed = [t for t in tickets if t.done()]
    assert len(shed) == 4 and shed == tickets[8:]  # refused at submission, not after waiting
    for t in shed:
        a = t.result(0)
        assert a.status == SHED and "deadline cannot be met" in a.message and a.total_ms == 0.0
    early = rig.sched.precheck(3.2)  # what a server asks before decoding a body: refused, and counted
    assert early is not None and early.status == SHED and rig.sched.queue_length == 8
    assert rig.sched.precheck(100.0) is None and rig.sched.queue_length == 8  # would be admitted: not queued
    rig.drain()
    a = answers(tickets[:8])
    assert all(x.status == OK and x.budget_met and x.stage == 0 for x in a)
    s = rig.sched.stats()
    assert s[OK] == 8 and s[SHED] == 5 and s["misses"] == 0 and s["batches"] == 2 and s["mean_batch"] == 4


def test_a_short_deadline_that_would_make_accepted_requests_late_is_shed(bundle) -> None:
    rig = Rig(bundle, max_batch=1)
    rig.submit(2, deadline_ms=2.6)      # stage 0 at batch 1: 1 ms each; the second ends at 2 + 0.5 margin
    (t,) = rig.submit(1, deadline_ms=1.6)  # it would go first and push the second past its deadline
    assert t.done() and t.result(0).status == SHED and "accepted request late" in t.result(0).message
    rig.drain()
    assert rig.sched.stats()["misses"] == 0


def test_queue_bound_and_closing(bundle) -> None:
    rig = Rig(bundle, max_queue=3)
    ok = rig.submit(3, deadline_ms=1000)
    (full,) = rig.submit(1, deadline_ms=1000)
    assert full.result(0).status == QUEUE_FULL and "queue is full" in full.result(0).message
    rig.sched.close(drain=True)
    assert all(x.status == OK for x in answers(ok))
    (late,) = rig.submit(1, deadline_ms=1000)
    assert late.result(0).status == CLOSED

    rig2 = Rig(bundle)
    queued = rig2.submit(5, deadline_ms=1000)
    rig2.sched.close(drain=False)
    assert [x.status for x in answers(queued)] == [CLOSED] * 5 and rig2.log == []


def test_fixed_depth_is_the_plain_stack(bundle) -> None:
    rig = Rig(bundle, stages=3)
    tickets = rig.submit(4, deadline_ms=8.0)  # fused prefix2 at batch 4 takes 5.7 ms
    (shed,) = rig.submit(1, deadline_ms=8.0)  # a second batch would end at 11.4 + margin
    assert shed.result(0).status == SHED
    rig.drain()
    assert rig.log == [("prefix2", 4)]
    assert all(x.stage == 2 and x.members == 4 and x.budget_met for x in answers(tickets))
    # a short deadline does not make it shallower: it misses instead
    rig2 = Rig(bundle, stages=3)
    (t,) = rig2.submit(1, deadline_ms=100)
    rig2.clock.advance_ms(97)
    rig2.drain()
    assert t.result(0).stage == 2 and not t.result(0).budget_met


def test_a_sample_with_non_finite_logits_fails_alone(bundle) -> None:
    rig = Rig(bundle, nan_ids={1})
    tickets = rig.submit(3, deadline_ms=100)
    rig.drain()
    a = answers(tickets)
    assert [x.status for x in a] == [OK, FAILED, OK]
    assert "NaN or infinite" in a[1].message and a[0].stage == 2 and a[2].stage == 2


def test_the_online_factor_plans_shallower_on_a_slow_device(bundle) -> None:
    # every stage takes twice its profiled time: stage 0 (2 ms) and stage 1 (4 ms) end at 6 ms;
    # stage 2 would take 6 more, past the 10 ms deadline
    rig = Rig(bundle, online=4)
    rig.slow[0] = 2.0
    (t,) = rig.submit(1, deadline_ms=10.0)
    rig.sched.step()
    assert t.result(0).stage == 1 and t.result(0).budget_met  # stage 2 planned at 2 x 3 ms: it does not fit
    assert rig.sched.stats()["load_factor"] == pytest.approx(2.0)
    plain = Rig(bundle, online=0)
    plain.slow[0] = 2.0
    (t2,) = plain.submit(1, deadline_ms=10.0)
    plain.sched.step()
    assert t2.result(0).stage == 2 and not t2.result(0).budget_met  # planned 6 + 3 <= 9.5 ms, took 6 + 6


def test_the_load_factor_is_forgotten_when_nothing_ran_for_a_horizon(bundle) -> None:
    # a burst on a slow device leaves a factor of 4; what it sheds runs no stage, so without a
    # horizon an idle server would shed every short request from then on
    from kdedge.runtime.scheduler import LOAD_HORIZON_S

    rig = Rig(bundle, online=4)
    rig.slow[0] = 4.0
    (t,) = rig.submit(1, deadline_ms=100.0)
    rig.drain()
    assert t.result(0).status == OK and rig.sched.stats()["load_factor"] == pytest.approx(4.0)
    rig.slow[0] = 1.0
    (shed,) = rig.submit(1, deadline_ms=3.0)  # stage 0 planned at 4 x 1 ms + the margin
    assert shed.result(0).status == SHED
    rig.clock.advance_ms(LOAD_HORIZON_S * 1e3 * 0.9)
    assert rig.sched.precheck(3.0) is not None and rig.sched.stats()["load_factor"] == pytest.approx(4.0)
    rig.clock.advance_ms(LOAD_HORIZON_S * 1e3 * 0.2)
    assert rig.sched.precheck(3.0) is None and rig.sched.stats()["load_factor"] == 1.0
    (t2,) = rig.submit(1, deadline_ms=3.0)
    rig.drain()
    assert t2.result(0).status == OK and t2.result(0).budget_met


def test_load_estimate_horizon() -> None:
    now = [0.0]
    est = LoadEstimate(4, horizon_s=2.0, clock=lambda: now[0])
    est.observe(3.0, 1.0)
    now[0] = 1.9
    assert est.factor() == 3.0
    est.observe(2.0, 1.0)  # a new observation keeps the window alive
    now[0] = 3.8
    assert est.factor() == 3.0
    now[0] = 4.0
    assert est.factor() == 1.0
    est.observe(1.5, 1.0)
    assert est.factor() == 1.5  # the forgotten ratios do not come back
    assert LoadEstimate(4).factor() == 1.0
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="online horizon"):
            LoadEstimate(4, horizon_s=bad)


def test_a_lone_slow_stage_does_not_move_the_load_factor() -> None:
    from kdedge.runtime.scheduler import _server_load

    load = _server_load(16)  # the 3rd largest ratio of the last 16 stages
    for _ in range(16):
        load.observe(0.5, 1.0)
    assert load.factor() == 1.0  # faster than planned: the plan stays the profile's
    load.observe(50.0, 1.0)      # one stage preempted for 50x its time
    load.observe(2.0, 1.0)
    assert load.factor() == 1.0
    load.observe(3.0, 1.0)       # three slow stages in the window: the device is busy
    assert load.factor() == 2.0
    for _ in range(16):          # quiet again for a window
        load.observe(1.0, 1.0)
    assert load.factor() == 1.0
    load.observe(float("nan"), 1.0)
    load.observe(1.0, 0.0)
    assert load.factor() == 1.0


def test_bad_submissions_raise(bundle) -> None:
    rig = Rig(bundle)
    with pytest.raises(InputError, match="channel"):
        rig.sched.submit(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="one sample"):
        rig.sched.submit(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        rig.sched.submit(np.full((1, 1, 8, 8), np.nan, np.float32))
    for bad in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(ValueError, match="deadline"):
            rig.sched.submit(rig.sample(), bad)
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(rig.runner, max_batch=0, start=False)
    with pytest.raises(ValueError, match="stages"):
        Scheduler(rig.runner, stages=4, start=False)


def test_anytime_needs_a_profile_or_costs(bundle) -> None:
    from kdedge.profile.latency import ProfileError

    rig = Rig(bundle)
    with pytest.raises(ProfileError, match="kdedge profile"):
        Scheduler(rig.runner, start=False, warmup=False)
    fixed = Scheduler(rig.runner, stages=2, start=False, warmup=False)  # a plain stack: bound only
    assert fixed.describe()["planned"] is False
    tickets = [fixed.submit(rig.sample(), 0.01) for _ in range(6)]
    assert not any(t.done() for t in tickets)


def test_costs_interpolate_the_profile_between_measured_batches() -> None:
    class Profile:
        batches = [1, 8, 32]

        def stat(self, graph: str, batch: int, stat: str = "p99") -> float:
            return {1: 1.0, 8: 2.4, 32: 4.8}[batch] * (2 if graph == "stage1" else 1)

    c = Costs.from_profile(Profile(), ["stage0", "stage1"], max_batch=40)
    assert c("stage0", 1) == 1.0 and c("stage0", 8) == pytest.approx(2.4) and c("stage0", 32) == pytest.approx(4.8)
    assert c("stage0", 4) == pytest.approx(1.0 + 1.4 * 3 / 7) and c("stage1", 20) == pytest.approx(2 * 3.6)
    assert c("stage0", 40) == pytest.approx(4.8 * 40 / 32) and c("stage0", 80) == pytest.approx(2 * c("stage0", 40))
    assert _interpolate([(4, 2.0)], 1) == 2.0
    with pytest.raises(ValueError, match="finite"):
        Costs({"stage0": [1.0, float("nan")]})


def test_the_worker_thread_answers_everything_and_closes(bundle) -> None:
    rig = Rig(bundle)
    sched = Scheduler(rig.runner, clock=rig.clock, max_batch=4, costs=Costs.from_function(latency, list(BASE), 4),
                      online=0, warmup=True)
    assert sched.wait_ready(10)
    got: list[Answer] = []
    lock = threading.Lock()

    def keep(a: Answer) -> None:
        with lock:
            got.append(a)

    def client(i: int) -> None:
        for j in range(25):
            x = np.zeros((1, 1, 8, 8), np.float32)
            x[0, 0, 0, 0] = i * 100 + j
            sched.submit(x, 1000.0, callback=keep)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.close(drain=True, timeout=30)
    assert len(got) == 100 and all(a.status == OK for a in got)
    assert sorted(a.label for a in got) == sorted((i * 100 + j) % K for i in range(4) for j in range(25))
    assert len({a.id for a in got}) == 100 and sched.stats()[OK] == 100 and sched.queue_length == 0
    assert sched.submit(np.zeros((1, 1, 8, 8), np.float32), 10).result(0).status == CLOSED


def test_answer_to_dict_and_top_k(bundle) -> None:
    a = Answer(3, OK, probs=np.array([0.1, 0.6, 0.3]), label=1, class_name="b", confidence=0.6, stage=1, members=2,
               batch=4, total_ms=1.5, deadline_ms=5.0, budget_met=True)
    assert [t["class"] for t in a.top_k(2, ["a", "b", "c"])] == ["b", "c"]
    assert a.top_k(10, ["a", "b", "c"])[-1] == {"label": 0, "class": "a", "p": 0.1}
    d = a.to_dict()
    assert d["class"] == "b" and d["stage"] == 1 and d["budget_met"] is True and "error" not in d
    assert Answer(4, SHED, "no").to_dict()["error"] == "no"


def test_rank_orders_by_p_then_label_on_both_paths() -> None:
    rng = np.random.default_rng(0)
    for n in (3, 10, 128, 129, 1000):  # the full sort up to 128 classes, a partition beyond
        p = rng.random((6, n)).round(1)  # many ties
        idx, val = rank(p, 5)
        k = min(5, n)
        for row, i, v in zip(p, idx, val):
            ref = sorted(range(n), key=lambda j: (-row[j], j))[:k]
            assert v.tolist() == [row[j] for j in ref]
            if n <= 128:  # beyond, which of several tied at the cut is kept is numpy's; order still by label
                assert i.tolist() == ref
            assert all((-row[a], a) < (-row[b], b) for a, b in zip(i, i[1:]))


def test_rank_row_orders_one_answer_as_rank_does() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 10, 128, 129):
        for _ in range(20):
            row = rng.random(n).round(1)  # many ties
            for k in (1, 3, RANKED, n, n + 4):
                ref = rank(row[None], k)
                if n <= 128:  # beyond, rank partitions first: which of several tied at the cut is kept is numpy's
                    assert rank_row(row.tolist(), k) == ref[0][0].tolist()
                assert rank_lists(row[None], k) == (ref[0].tolist(), ref[1].tolist())
    two = rng.random((2, 10)).round(1)
    assert rank_lists(two, 3) == tuple(a.tolist() for a in rank(two, 3))


def test_scheduler_answers_rank_like_top_k_on_demand(bundle) -> None:
    rig = Rig(bundle)
    ts = rig.submit(4, deadline_ms=100)
    rig.drain()
    classes = [str(c) for c in range(K)]
    for a in answers(ts):
        assert len(a.ranked) == min(RANKED, K) and a.ranked[0] == (a.label, a.confidence)
        bare = Answer(a.id, OK, probs=a.probs)  # no ranking carried: numpy ranks on demand
        for k in (1, 3, RANKED, K):
            assert a.top_k(k, classes) == bare.top_k(k, classes)
        assert a.top_k(K, classes)[:RANKED] == [{"label": i, "class": str(i), "p": p} for i, p in a.ranked]


def test_scheduler_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import kdedge.runtime.scheduler, kdedge.serve, kdedge.serve.app, kdedge.serve.decode\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_freeze_gc_freezes_after_warm_up_and_only_when_asked(bundle) -> None:
    import gc

    rig = Rig(bundle)
    costs = Costs.from_function(latency, list(BASE), 4)
    gc.unfreeze()  # whatever an earlier test in this process froze
    try:
        for freeze, frozen in ((False, False), (True, True)):
            sched = Scheduler(rig.runner, clock=rig.clock, max_batch=4, costs=costs, online=0, warmup=True,
                              freeze_gc=freeze)
            assert sched.wait_ready(10)
            sched.close()
            assert (gc.get_freeze_count() > 0) is frozen
    finally:
        gc.unfreeze()  # this test process's objects back to the oldest generation
