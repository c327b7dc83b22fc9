"""Real-time execution plumbing (kdedge.runtime.realtime): policies read back from /proc for
every thread, onnxruntime's intra-op threads included, CPU sets, the refusal line, gc."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading

import pytest

from kdedge.runtime import realtime as rt


def _fifo_allowed() -> str | None:
    why = rt.supported()
    if why:
        return why
    try:
        done: list[BaseException | None] = []

        def probe() -> None:  # in a thread of its own: the test's thread keeps its policy
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                done.append(None)
            except OSError as e:
                done.append(e)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return None if done[0] is None else f"this machine does not allow SCHED_FIFO here ({done[0]})"
    except OSError as e:
        return str(e)


FIFO = _fifo_allowed()
needs_fifo = pytest.mark.skipif(FIFO is not None, reason=FIFO or "")


def _cpu_latency_allowed() -> str | None:
    try:
        rt.CpuLatencyHold(rt._MAX_CPU_LATENCY_US - 1).close()  # asks for nothing stricter than now
    except rt.RealtimeError as e:
        return str(e)
    return None


QOS = _cpu_latency_allowed()
needs_qos = pytest.mark.skipif(QOS is not None, reason=QOS or "")


def _latency_fds() -> list[str]:
    """This process's open files that are the PM QoS device."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == rt.CPU_LATENCY_DEVICE:
                out.append(fd)
        except OSError:
            pass
    return out


def _in_thread(fn):
    """Run ``fn`` in a fresh thread (so the test runner's own thread keeps ordinary scheduling)."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(120)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def _matmul_onnx(path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


def test_config_is_validated() -> None:
    assert rt.Realtime().key() == "rtfifo50" and rt.Realtime(priority=7, policy="rr").key() == "rtrr7"
    with pytest.raises(ValueError, match="priority must be an integer in 1..98"):
        rt.Realtime(priority=99)
    with pytest.raises(ValueError, match="priority must be an integer"):
        rt.Realtime(priority=0)
    with pytest.raises(ValueError, match="unknown real-time policy 'deadline'"):
        rt.Realtime(policy="deadline")
    with pytest.raises(ValueError, match="CPU wake-up latency"):
        rt.Realtime(cpu_latency_us=-1)
    with pytest.raises(ValueError, match="CPU wake-up latency"):
        rt.Realtime(cpu_latency_us=True)  # type: ignore[arg-type]
    assert rt.Realtime().cpu_latency_us is None and rt.Realtime(cpu_latency_us=0).to_dict()["cpu_latency_us"] == 0
    assert rt.parse_cpu_latency("off") is None and rt.parse_cpu_latency(" 50 ") == 50
    for bad in ("-1", "fast", "1.5"):
        with pytest.raises(ValueError, match="--cpu-latency takes microseconds"):
            rt.parse_cpu_latency(bad)
    # not part of the profile key, like the CPU set
    assert rt.Realtime(cpu_latency_us=None).key() == rt.Realtime().key() == "rtfifo50"


def test_cpu_sets_parse_and_are_checked() -> None:
    cpus = sorted(rt.usable_cpus())
    assert rt.parse_cpus(str(cpus[0])) == (cpus[0],)
    if len(cpus) >= 2:
        assert rt.parse_cpus(f"{cpus[0]}-{cpus[1]}") == tuple(range(cpus[0], cpus[1] + 1))
    for bad in ("", "a", "1-0", "-1", "0,,x", "1_0", "0-", "+1", "0-1-2"):
        with pytest.raises(ValueError, match="--cpus takes CPU numbers"):
            rt.parse_cpus(bad)
    with pytest.raises(ValueError, match="CPU 100000 is not one this process may run on"):
        rt.parse_cpus("100000")
    # a huge range is refused before it is expanded (it used to take seconds and gigabytes)
    with pytest.raises(ValueError, match="CPU 10000000000000 is not one this process may run on"):
        rt.parse_cpus(f"{cpus[0]}-10000000000000")


def test_realtime_options_fill_defaults_and_refuse_what_needs_realtime() -> None:
    from kdedge.cli.common import realtime_options

    assert realtime_options(False, None, None, None, None, None) is None
    assert realtime_options(True, None, None, None, None, None) == rt.Realtime()
    got = realtime_options(True, 7, "rr", "0", False, "off")
    assert (got.priority, got.policy, got.cpus, got.lock_memory, got.cpu_latency_us) == (7, "rr", (0,), False, None)
    # a value equal to the default is still "given": without --realtime it would change nothing
    with pytest.raises(ValueError, match=r"^--rt-priority applies only with --realtime$"):
        realtime_options(False, 50, None, None, None, None)
    with pytest.raises(ValueError, match=r"^--mlock/--no-mlock and --cpu-latency apply only with --realtime$"):
        realtime_options(False, None, None, None, False, "0")


def test_thread_policy_reads_proc() -> None:
    name, prio = rt.thread_policy(threading.get_native_id())
    assert name in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH", "SCHED_IDLE") and prio >= 0
    assert threading.get_native_id() in rt.thread_ids()


@needs_fifo
def test_caller_thread_gets_and_leaves_the_policy() -> None:
    def body() -> tuple[tuple[str, int], tuple[str, int]]:
        tid = threading.get_native_id()
        rt.set_thread(0, rt.Realtime(priority=3))
        during = rt.thread_policy(tid)
        rt.set_normal(0)
        return during, rt.thread_policy(tid)

    during, after = _in_thread(body)
    assert during == ("SCHED_FIFO", 3) and after == ("SCHED_OTHER", 0)


@needs_fifo
@pytest.mark.parametrize("created_under_fifo", [True, False], ids=["inherited", "adopted"])
def test_onnxruntime_intra_op_threads_run_real_time(created_under_fifo: bool, tmp_path) -> None:
    """onnxruntime creates its intra-op pool when a session is created. Created by a FIFO thread,
    the pool inherits the policy (glibc's default); created otherwise, ThreadAdopter sets it."""
    ort = pytest.importorskip("onnxruntime")
    path = _matmul_onnx(tmp_path / "m.onnx")
    cfg = rt.Realtime(priority=4)

    def body() -> list[tuple[int, str, int]]:
        if created_under_fifo:
            rt.set_thread(0, cfg)
        adopter = rt.ThreadAdopter(cfg)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        new = adopter.new_threads()
        seen = [(t, *rt.thread_policy(t)) for t in new]
        if not created_under_fifo:
            assert all(p == "SCHED_OTHER" for _, p, _ in seen)
            rt.set_thread(0, cfg)
            adopter.adopt()
            seen = [(t, *rt.thread_policy(t)) for t in new]
        adopter.check(new)
        del sess
        rt.set_normal(0)
        return seen

    seen = _in_thread(body)
    assert len(seen) >= 2  # intra_op_num_threads=3: the caller plus two pool threads
    assert {(p, q) for _, p, q in seen} == {("SCHED_FIFO", 4)}


def test_refusal_says_what_to_grant(monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*_a: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", deny)
    with pytest.raises(rt.RealtimeError) as e:
        rt.set_thread(0, rt.Realtime(priority=10))
    text = str(e.value)
    assert "the OS refused SCHED_FIFO at priority 10" in text and "\n" not in text
    for hint in ("setcap cap_sys_nice", "ulimit -r", "CPUSchedulingPolicy=", "--cap-add=SYS_NICE"):
        assert hint in text


@pytest.mark.skipif(shutil.which("setpriv") is None or not sys.platform.startswith("linux"),
                    reason="needs util-linux setpriv to drop CAP_SYS_NICE")
def test_refusal_without_cap_sys_nice_in_a_real_process() -> None:
    """The same refusal from the kernel itself: a child without CAP_SYS_NICE (and RLIMIT_RTPRIO
    0, the default for users) asks for SCHED_FIFO."""
    code = ("from kdedge.runtime import realtime as rt\n"
            "try:\n    rt.set_thread(0, rt.Realtime(priority=10))\n"
            "except rt.RealtimeError as e:\n    print('REFUSED', e)\nelse:\n    print('ALLOWED')\n")
    res = subprocess.run(["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if "setpriv:" in res.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    if res.stdout.startswith("ALLOWED"):  # RLIMIT_RTPRIO > 0 for this user: allowed without the capability
        pytest.skip("RLIMIT_RTPRIO allows SCHED_FIFO without CAP_SYS_NICE here")
    assert res.stdout.startswith("REFUSED the OS refused SCHED_FIFO at priority 10") and "setcap" in res.stdout


def test_gc_guard_keeps_collections_between_requests() -> None:
    guard = rt.GcGuard()
    enabled = gc.isenabled()
    try:
        gc.enable()
        guard.enter()
        guard.enter()  # nested: still disabled
        assert not gc.isenabled()
        guard.leave()
        assert not gc.isenabled()
        guard.leave()
        assert gc.isenabled()
        gc.disable()  # a caller that disabled gc keeps it disabled
        guard.enter()
        guard.leave()
        assert not gc.isenabled()
    finally:
        (gc.enable if enabled else gc.disable)()


# -- the runner in real time ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    from helpers_runtime import toy_bundle

    return toy_bundle(tmp_path_factory.mktemp("rt"))[0]


def _x():
    import numpy as np

    return np.zeros((1, 1, 8, 8), np.float32)


@needs_fifo
def test_runner_gives_every_request_thread_the_policy(bundle) -> None:
    from kdedge.runtime import Runner
    from kdedge.runtime.policies import Deadline, Full

    seen: dict[str, object] = {}

    class Spy(Full):
        def decide(self, ctx):  # inside a request: which policy runs it, is gc off?
            seen["policy"] = rt.thread_policy(threading.get_native_id())
            seen["gc"] = gc.isenabled()
            return super().decide(ctx)

    def body():
        tid = threading.get_native_id()
        cfg = rt.Realtime(priority=6, lock_memory=False)
        with Runner(bundle, threads=2, realtime=cfg) as r:
            assert r.run_key == "rtfifo6"
            r.warmup()
            r.run(_x(), Spy())
            # the watchdog's thread (started by a deadline with an abort) runs one priority above
            r.run(_x(), Deadline(1000.0, latencies_ms=[0.01] * 3, watchdog_min_ms=0))
            threads = r.realtime_threads
        return tid, threads, rt.thread_policy(tid)

    gc_was = gc.isenabled()
    tid, threads, after = _in_thread(body)
    assert gc.isenabled() == gc_was and seen["gc"] is False and seen["policy"] == ("SCHED_FIFO", 6)
    policies = {t: (p, q) for t, p, q, _ in threads}
    assert policies[tid] == ("SCHED_FIFO", 6)
    # the caller, onnxruntime's pool thread of each of the three stage sessions, the watchdog
    assert len(policies) >= 5
    assert sorted(set(policies.values())) == [("SCHED_FIFO", 6), ("SCHED_FIFO", 7)]
    assert list(policies.values()).count(("SCHED_FIFO", 7)) == 1
    assert after == ("SCHED_OTHER", 0)  # close() gave the creating thread its policy back


@needs_fifo
def test_runner_pins_request_threads_to_cpus(bundle) -> None:
    from kdedge.runtime import Runner

    cpu = min(rt.usable_cpus())

    def body():
        before = rt.thread_cpus(threading.get_native_id())
        with Runner(bundle, threads=1, realtime=rt.Realtime(priority=2, cpus=(cpu,), lock_memory=False)) as r:
            r.run(_x())
            pinned = [c for *_, c in r.realtime_threads]
        return before, pinned, rt.thread_cpus(threading.get_native_id())

    before, pinned, after = _in_thread(body)
    assert pinned and all(c == [cpu] for c in pinned)
    assert after == before


def test_runner_refusal_is_one_line_and_leaves_nothing_behind(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdedge.runtime import Runner

    def deny(*_a: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", deny)
    before = set(rt.thread_ids())
    with pytest.raises(rt.RealtimeError, match="the OS refused SCHED_FIFO at priority 50.*setcap cap_sys_nice"):
        Runner(bundle, threads=2, realtime=True)
    assert set(rt.thread_ids()) <= before  # no session (and no intra-op pool) was left open


def test_realtime_profiles_are_keyed_apart(bundle, tmp_path) -> None:
    """A real-time run plans with a profile measured in real time, and says how to make one."""
    import shutil

    from kdedge.bundle.profile.store import _run_flags
    from kdedge.profile.latency import MissingProfileError, resolve_profile
    from kdedge.runtime.realtime import realtime_key, split_realtime_key
    from kdedge.targets import open_bundle

    assert realtime_key("", rt.Realtime(priority=9)) == "rtfifo9"
    assert realtime_key("torch-cuda-cudagraphs", rt.Realtime(policy="rr")) == "torch-cuda-cudagraphs-rtrr50"
    assert split_realtime_key("torch-cuda-rtrr50") == ("torch-cuda", "rtrr50")
    assert split_realtime_key("torch-cuda-cudagraphs") == ("torch-cuda-cudagraphs", None)
    assert _run_flags("rtfifo9") == " --realtime --rt-priority 9"
    assert _run_flags("torch-cuda-rtrr3") == " --device cuda --realtime --rt-priority 3 --rt-policy rr"
    b = open_bundle(shutil.copytree(bundle, tmp_path / "b.kdedge"))
    with pytest.raises(MissingProfileError, match=r"run as rtfifo9.*kdedge profile .* --realtime --rt-priority 9"):
        resolve_profile(b, "auto", target="onnx", threads=1, key="rtfifo9")


@needs_fifo
def test_cli_profile_and_run_in_real_time(bundle, tmp_path) -> None:
    import json
    import shutil

    import numpy as np

    b = shutil.copytree(bundle, tmp_path / "b.kdedge")
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdedge.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    qos = ["--cpu-latency", "0"] if QOS is None else []  # the device is root's: where allowed, ask for it
    res = cli("profile", str(b), "--threads", "1", "--runs", "5", "--warmup", "1", "--quiet", "--no-plot",
              "--realtime", "--rt-priority", "3", "--no-mlock", *qos)
    assert res.returncode == 0, res.stderr
    stored = [p.name for p in (b / "profiles").glob("*.json")]
    assert len(stored) == 1 and stored[0].endswith("-rtfifo3.json")
    prof = json.loads((b / "profiles" / stored[0]).read_text())
    assert prof["realtime"] == {"policy": "SCHED_FIFO", "priority": 3, "cpus": None, "lock_memory": False,
                                "freeze_gc": True, "cpu_latency_us": 0 if qos else None} and prof["run_key"] == "rtfifo3"
    res = cli("run", str(b), "--input", str(tmp_path / "x.npy"), "--threads", "1", "--deadline-ms", "1000",
              "--realtime", "--rt-priority", "3", "--no-mlock", "--json", *qos)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["realtime"]["priority"] == 3
    res = cli("run", str(b), "--input", str(tmp_path / "x.npy"), "--threads", "1", "--deadline-ms", "1000")
    assert res.returncode == 2 and "no latency profile" in res.stderr  # ordinary runs need an ordinary profile
    res = cli("run", str(b), "--input", str(tmp_path / "x.npy"), "--rt-priority", "3")
    assert res.returncode == 2 and "applies only with --realtime" in res.stderr
    res = cli("run", str(b), "--input", str(tmp_path / "x.npy"), "--cpu-latency", "0")
    assert res.returncode == 2 and "applies only with --realtime" in res.stderr
    res = cli("run", str(b), "--input", str(tmp_path / "x.npy"), "--realtime", "--cpu-latency", "soon")
    assert res.returncode == 2 and res.stderr.strip() == "error: --cpu-latency takes microseconds >= 0 or off, got 'soon'"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv to drop CAP_SYS_NICE")
def test_cli_refusal_without_the_capability(bundle, tmp_path) -> None:
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)
    res = subprocess.run(["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", sys.executable, "-m",
                          "kdedge.cli.main", "run", str(bundle), "--input", str(tmp_path / "x.npy"), "--realtime"],
                         capture_output=True, text=True, env=env, timeout=300)
    if "setpriv:" in res.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {res.stderr.strip()}")
    if res.returncode == 0:
        pytest.skip("RLIMIT_RTPRIO allows SCHED_FIFO without CAP_SYS_NICE here")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the OS refused SCHED_FIFO at priority 50")
    assert "Traceback" not in res.stderr


@needs_qos
def test_cpu_latency_hold_is_a_kernel_request_while_open() -> None:
    """The kernel applies the smallest of all requests: while held, the limit in force is at
    most ours; the request is this process's open file and is gone when it is closed."""
    before = set(_latency_fds())
    with rt.CpuLatencyHold(7) as hold:
        assert hold.held
        limit = rt.cpu_latency_limit()
        assert limit is not None and limit <= 7
        assert len(set(_latency_fds()) - before) == 1
    assert not hold.held and set(_latency_fds()) == before
    hold.close()  # twice is fine


def test_cpu_latency_refusals_say_what_to_do(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(rt.RealtimeError) as e:
        rt.CpuLatencyHold(0, device=str(tmp_path / "no-such-device"))
    text = str(e.value)
    assert "does not exist" in text and "--device" in text and "run without --cpu-latency" in text and "\n" not in text

    real_open = os.open

    def deny(path, *a, **k):  # what a user without write access to the root-only device gets
        if str(path).endswith("cpu_dma_latency"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(rt.RealtimeError) as e:
        rt.CpuLatencyHold(0)
    text = str(e.value)
    assert "was refused (Permission denied; only root may write it)" in text and "run without --cpu-latency" in text


@needs_fifo
@needs_qos
def test_runner_holds_the_cpu_latency_while_open(bundle) -> None:
    from kdedge.runtime import Runner

    def body():
        before = set(_latency_fds())
        with Runner(bundle, threads=1, realtime=rt.Realtime(priority=2, lock_memory=False, cpu_latency_us=0)) as r:
            r.run(_x())
            during = set(_latency_fds()) - before
            limit = rt.cpu_latency_limit()
        return during, limit, set(_latency_fds()) - before

    during, limit, after = _in_thread(body)
    assert len(during) == 1 and limit == 0 and not after


@needs_fifo
def test_runner_refused_cpu_latency_leaves_nothing_behind(bundle, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdedge.runtime import Runner

    monkeypatch.setattr(rt, "CPU_LATENCY_DEVICE", str(tmp_path / "absent"))

    def body():
        tid = threading.get_native_id()
        before = set(rt.thread_ids())
        try:
            Runner(bundle, threads=2, realtime=rt.Realtime(priority=2, lock_memory=False, cpu_latency_us=0))
        except rt.RealtimeError as e:
            return str(e), rt.thread_policy(tid), set(rt.thread_ids()) <= before
        return None, None, None

    msg, policy, no_threads = _in_thread(body)
    assert msg is not None and "run without --cpu-latency" in msg
    assert policy == ("SCHED_OTHER", 0) and no_threads  # policy given back, no session left open
