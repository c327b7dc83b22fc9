"""Deadlines on a busy device: the anytime runner with and without real-time execution and the
online load estimate, quiet and with CPU hogs running, against what a user would pick instead
(results in docs/runtime.md). Not a test: it times things.

For each model (the demo HNE trained on mnist5k, and the paper-size CIFAR HNE, ``hne`` with
``config: resnet, B: 4``, random weights, synthetic inputs of the real shape):

1. every row's configuration is profiled on the quiet machine, as a user would (``kdedge
   profile`` with its thread count and, for the real-time rows, under ``--realtime``);
2. N batch-1 requests get deadlines drawn uniformly between stage 0's p99 and the chain's p99
   (of the default profile, 1 thread; the same deadlines for every row);
3. in each condition (quiet; ``--hog`` busy-loop processes, one per CPU, started and stopped
   here, each bounded in time) the rows run request by request, interleaved, so that they see
   the same machine;
4. rows: ``--threads N`` with every CPU (the default before it became 1); the default (1
   thread); ``--realtime``; ``--realtime --cpu-latency 0`` (the CPU wake-up latency request;
   the benchmark holds it only while such a row runs, since it is system-wide);
   ``--realtime --cpu-latency 0 --online``; and the plain alternative: one onnxruntime
   session of the fused model at the deepest depth whose profiled median fits the deadline (no
   anytime stop; every CPU, as onnxruntime's own default).

Rows take turns in blocks of ``--block`` requests. Columns: misses (all requests / counted:
deadlines at least the row's own stage-0 p99, which a request can meet at all), accuracy (demo
only), mean stage, share of requests that reached the deepest feasible stage (the deepest whose
cumulative p99 in the row's own quiet profile, plus the margin, fits), latency p50/p99. Counted
misses are split by cause: stage 0 alone was late (it always runs), or the answer was late after
the policy went on to a later stage; and how many fell among a block's first ``--switch-in``
requests, which run on caches the other rows' blocks left cold.

    .venv/bin/python bench/bench_contention.py --json /tmp/contention.json
    .venv/bin/python bench/bench_contention.py --models demo --requests 2000      # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


# ---------------------------------------------------------------------------------------------
# the hog


def _spin(until: float) -> None:
    x = 0
    while time.time() < until:
        x += 1


class Hog:
    """One busy-loop process per CPU, started and stopped by the benchmark; each also stops on
    its own after ``max_s`` seconds (a crashed benchmark leaves no hog behind for long)."""

    def __init__(self, procs: int, max_s: float) -> None:
        self.procs, self.max_s = procs, max_s
        self._ps: list[Any] = []

    def __enter__(self) -> "Hog":
        ctx = mp.get_context("spawn")
        until = time.time() + self.max_s
        self._ps = [ctx.Process(target=_spin, args=(until,), daemon=True) for _ in range(self.procs)]
        for p in self._ps:
            p.start()
        time.sleep(0.5)  # let them reach the loop
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self._ps:
            p.terminate()
        for p in self._ps:
            p.join(5)


# ---------------------------------------------------------------------------------------------
# models


def demo_bundle(work: Path, epochs: int) -> tuple[Path, np.ndarray, np.ndarray | None]:
    from bench_export import _train

    from kdedge.export import export_run
    from kdedge.targets import open_bundle

    run = work / "runs" / "hne_mnist_demo"
    _train(str(ROOT / "configs" / "hne_mnist_demo.yaml"), run, epochs)
    path = work / "demo-hne.kdedge"
    if not path.is_dir():
        export_run(run, path, force=True)
    from bench_runtime import test_data

    x, y = test_data(open_bundle(path), None)
    return path, x, y


def cifar_bundle(work: Path) -> tuple[Path, np.ndarray, np.ndarray | None]:
    path = work / "cifar-hne.kdedge"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3, 32, 32)).astype(np.float32)
    if not path.is_dir():
        import torch

        from kdedge.export import export
        from kdedge.models import create_model

        torch.manual_seed(0)
        model = create_model("hne", num_classes=100, in_channels=3, input_size=(32, 32), config="resnet", B=4).eval()
        info = {"name": "synthetic-cifar", "num_classes": 100, "in_channels": 3, "input_size": [32, 32],
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "scale": 1 / 255, "channel_order": "RGB",
                "class_names": [str(i) for i in range(100)], "resize": None}
        export(model, path, info=info, val_data=(x[:64], np.zeros(64, np.int64)), force=True)
    return path, x, None


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class Row:
    name: str
    threads: int
    realtime: bool = False
    online: bool = False
    cpu_latency: bool = False  # with realtime: the PM QoS wake-up latency request (--cpu-latency 0)


def _rt(priority: int, cpu_latency: bool = False) -> Any:
    from kdedge.runtime.realtime import Realtime

    return Realtime(priority=priority, cpu_latency_us=0 if cpu_latency else None)


def _latency_hold(row: Any) -> Any:
    """The wake-up latency request is system-wide: the rows' runners are opened without it and
    the benchmark holds it only while a row that asks for it runs (and while it is profiled)."""
    from kdedge.runtime.realtime import CpuLatencyHold

    if isinstance(row, Row) and row.realtime and row.cpu_latency:
        return CpuLatencyHold(0)
    return contextlib.nullcontext()


def profile_row(bundle: Path, row: Row, runs: int, priority: int) -> Any:
    from kdedge.profile.latency import measure_profile

    return measure_profile(bundle, batches=(1,), runs=runs, warmup=50, threads=row.threads,
                           realtime=_rt(priority, row.cpu_latency) if row.realtime else None)


def _stats(prof: Any, graphs: list[str], stat: str) -> np.ndarray:
    return np.array([prof.stat(g, 1, stat) for g in graphs])


def run_condition(bundle: Path, x: np.ndarray, y: np.ndarray | None, rows: list[Row], profiles: dict[str, Any],
                  deadlines: np.ndarray, margin_ms: float, priority: int, fused_threads: int,
                  block: int = 100, gap_s: float = 0.05) -> dict[str, Any]:
    """Every row on the same requests, interleaved request by request."""
    import onnxruntime as ort

    from kdedge.runtime import Deadline, Runner
    from kdedge.runtime.realtime import set_normal, set_thread

    runners = {}
    for row in rows:
        runners[row.name] = Runner(bundle, threads=row.threads, profile=profiles[row.name],
                                   realtime=_rt(priority, cpu_latency=False) if row.realtime else None)
        set_normal(0)  # the next row's runner is created by an ordinary thread
    policies = {row.name: Deadline(1.0, margin_ms=margin_ms, online=row.online) for row in rows}
    for row in rows:
        r = runners[row.name]
        if row.realtime:
            set_thread(0, r.realtime)
        r.warmup()
        set_normal(0)
    # the plain alternative: one session per fused prefix, plain onnxruntime, at every CPU (its
    # default) and at one thread; the depth of each request chosen by the sessions' own medians
    b = runners[rows[0].name].bundle
    plain: dict[str, list[Any]] = {}
    for key, t in (("fused", fused_threads), ("fused1", 1)):
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.log_severity_level = 3
        plain[key] = [ort.InferenceSession(str(b.file(p, "onnx")), so, providers=["CPUExecutionProvider"])
                      for p in b.prefixes]
        for s in plain[key]:
            for _ in range(20):
                s.run(None, {"input": x[:1]})
    plain_lg = [p.logits_tensor for p in b.prefixes]

    N = len(deadlines)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in [*runners, "fused", "fused1"]:
        out[name] = {"stage": np.zeros(N, np.int64), "total": np.zeros(N), "correct": np.zeros(N, bool),
                     "went_on": np.zeros(N, bool)}
    rt_cfg = {row.name: runners[row.name].realtime for row in rows}

    def one(row: Row | str, i: int) -> None:
        d = float(deadlines[i])
        xi = x[i % len(x): i % len(x) + 1]
        if isinstance(row, str):  # a plain fused session
            fits = np.flatnonzero(np.asarray(profiles[row]) <= d)
            j = int(fits.max()) if fits.size else 0
            t0 = time.perf_counter()
            lg = plain[row][j].run([plain_lg[j]], {"input": xi})[0]
            o = out[row]
            o["total"][i] = (time.perf_counter() - t0) * 1e3
            o["stage"][i] = b.prefixes[j].last_stage
            o["went_on"][i] = j > 0
            if y is not None:
                o["correct"][i] = int(lg.argmax()) == y[i % len(y)]
            return
        pol = policies[row.name]
        pol.deadline_ms = pol.budget_ms = d
        res = runners[row.name].run(xi, pol)
        o = out[row.name]
        o["stage"][i], o["total"][i] = res.stage[0], res.total_ms[0]
        o["went_on"][i] = len(res.graphs) > 1 or res.aborted is not None  # ran (or started) a stage after 0
        if y is not None:
            o["correct"][i] = res.labels[0] == y[i % len(y)]

    # Rows take turns in blocks of `block` requests: all see the same machine over time, and the
    # idle spinning of one row's thread pools after its last request touches only the first
    # requests of the next block, not every request of every other row.
    for start in range(0, N, block):
        for row in [*rows, "fused", "fused1"]:
            cfg = rt_cfg[row.name] if isinstance(row, Row) else None
            if cfg is not None:
                set_thread(0, cfg)
            with _latency_hold(row):
                for i in range(start, min(start + block, N)):
                    one(row, i)
            if cfg is not None:
                set_normal(0)
            time.sleep(gap_s)  # the pools of the row just run stop spinning before the next row
    for r in runners.values():
        r.close()
    set_normal(0)
    return out


def summarize(out: dict[str, dict[str, np.ndarray]], deadlines: np.ndarray, profiles: dict[str, Any],
              stage_names: list[str], has_labels: bool, margin_ms: float,
              answer_p99: dict[str, float], block: int, switch_in: int) -> dict[str, Any]:
    rows = {}
    default = list(profiles)[1]
    for name, o in out.items():
        plain = name.startswith("fused")
        prof = profiles[default if plain else name]
        p99 = _stats(prof, stage_names, "p99")
        cum = np.cumsum(p99) + margin_ms
        # counted: deadlines at least the p99 of the time to stage 0's answer through the runner
        # (measured quiet in the row's configuration; the plain rows use the default row's)
        counted = deadlines >= answer_p99[default if plain else name]
        # the deepest stage the row's own quiet profile says fits (cumulative p99 + margin)
        deepest = np.array([int(np.flatnonzero(cum <= d).max()) if (cum <= d).any() else 0 for d in deadlines])
        miss = o["total"] > deadlines
        # a block's first requests run on caches that the other rows' blocks (and the idle gap)
        # left cold: what a device running one model does not see
        first = np.arange(len(deadlines)) % block < switch_in
        cm = miss & counted
        rows[name] = {
            "miss_all": float(miss.mean()), "miss_counted": float(miss[counted].mean()) if counted.any() else None,
            "counted": int(counted.sum()),
            "accuracy": float(o["correct"].mean()) if has_labels else None,
            "mean_stage": float(o["stage"].mean()),
            "at_deepest_feasible": float((o["stage"] >= deepest).mean()),
            "p50_ms": float(np.median(o["total"])),
            "p99_ms": float(np.percentile(o["total"], 99, method="inverted_cdf")),
            # counted misses by cause: stage 0 alone was late (it always runs: no stop rule can
            # help), or a stage the policy chose to run made the answer late; and how many of
            # them were among a block's first requests
            "counted_misses": int(cm.sum()),
            "counted_misses_stage0": int((cm & (o["stage"] == 0) & ~o["went_on"]).sum()),
            "counted_misses_went_on": int((cm & ((o["stage"] > 0) | o["went_on"])).sum()),
            "counted_misses_switch_in": int((cm & first).sum()),
            "switch_in_requests": int(first.sum()),
        }
    return rows


def stage0_answer_p99(bundle: Path, x: np.ndarray, row: Row, prof: Any, priority: int, runs: int = 1000) -> float:
    """p99 of the time to stage 0's answer through the runner (request start to result, runner
    overhead included) in the row's configuration, quiet: a deadline below it cannot be met."""
    from kdedge.runtime import Fixed, Runner
    from kdedge.runtime.realtime import set_normal

    with Runner(bundle, threads=row.threads, profile=prof,
                realtime=_rt(priority, row.cpu_latency) if row.realtime else None) as r:
        r.warmup()
        t = [r.run(x[i % len(x): i % len(x) + 1], Fixed(1, fused=False)).total_ms[0] for i in range(runs)]
    set_normal(0)
    return float(np.percentile(t, 99, method="inverted_cdf"))


def plain_medians(bundle: Path, x: np.ndarray, threads: int, runs: int = 300) -> list[float]:
    """Median batch-1 time of each fused prefix alone in a plain onnxruntime session (quiet):
    what a user of the plain alternative would measure to choose a depth."""
    import onnxruntime as ort

    from kdedge.targets import open_bundle

    b = open_bundle(bundle)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    out = []
    for p in b.prefixes:
        s = ort.InferenceSession(str(b.file(p, "onnx")), so, providers=["CPUExecutionProvider"])
        for _ in range(30):
            s.run([p.logits_tensor], {"input": x[:1]})
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s.run([p.logits_tensor], {"input": x[:1]})
            t.append((time.perf_counter() - t0) * 1e3)
        out.append(float(np.median(t)))
        del s
    return out


def online_cost_us(n: int = 100_000) -> dict[str, float]:
    """Per-stage cost of the online estimate: one observe and one planned latency."""
    from kdedge.runtime import Deadline

    on = Deadline(5.0, latencies_ms=[1.0, 1.0, 1.0], online=True)
    off = Deadline(5.0, latencies_ms=[1.0, 1.0, 1.0])

    class Ctx:
        num_stages, prefixes, stage = 3, 0, 1

    ctx = Ctx()
    res = {}
    for name, pol in (("online", on), ("profile", off)):
        t0 = time.perf_counter()
        for _ in range(n):
            pol.observe("stage1", 0.9, 1, 3, None)  # type: ignore[arg-type]
            pol.latency(ctx, 1)  # type: ignore[arg-type]
        res[name] = (time.perf_counter() - t0) / n * 1e6
    res["extra_per_stage"] = res["online"] - res["profile"]
    return res


def bench_model(name: str, bundle: Path, x: np.ndarray, y: np.ndarray | None, requests: int, args: Any,
                margin: float) -> dict[str, Any]:
    from kdedge.targets import open_bundle
    from kdedge.targets.threads import default_threads, usable_cpus

    nd, ncpu = default_threads(), usable_cpus()
    rows = [Row(f"--threads {ncpu} (all CPUs, the old default)", ncpu), Row(f"default ({nd} thread)", nd),
            Row(f"--realtime ({args.rt_threads} thread)", args.rt_threads, realtime=True),
            Row(f"--realtime --cpu-latency 0 ({args.rt_threads} thread)", args.rt_threads, realtime=True,
                cpu_latency=True),
            Row(f"--realtime --cpu-latency 0 --online ({args.rt_threads} thread)", args.rt_threads, realtime=True,
                online=True, cpu_latency=True)]
    b = open_bundle(bundle)
    stage_names = [s.name for s in b.stages]
    profiles: dict[str, Any] = {}
    t0 = time.perf_counter()
    ncpu = usable_cpus()
    for row in rows:
        key = (row.threads, row.realtime, row.cpu_latency)
        same = next((n for n, r in zip(profiles, rows) if (r.threads, r.realtime, r.cpu_latency) == key), None)
        profiles[row.name] = profiles[same] if same else profile_row(bundle, row, args.profile_runs, args.priority)
    profiles["fused"] = plain_medians(bundle, x, ncpu)  # every CPU, as onnxruntime does by default
    profiles["fused1"] = plain_medians(bundle, x, 1)
    answer_p99 = {row.name: stage0_answer_p99(bundle, x, row, profiles[row.name], args.priority) for row in rows}
    print(f"  profiled in {time.perf_counter() - t0:.0f} s", flush=True)
    ref = profiles[rows[1].name]
    lo = float(ref.stat("stage0", 1, "p99"))
    hi = float(ref.stat("chain", 1, "p99"))
    deadlines = np.random.default_rng(args.seed).uniform(lo, hi, size=requests)
    result: dict[str, Any] = {"model": name, "requests": requests, "deadline_range_ms": [lo, hi], "margin_ms": margin,
                              "plain_fused_medians_ms": {"all_cpus": profiles["fused"], "one_thread": profiles["fused1"]},
                              "stage0_answer_p99_ms": answer_p99,
                              "stages": len(stage_names), "profiles": {
                                  n: {g: {s: p.stat(g, 1, s) for s in ("median", "p99")} for g in [*stage_names, "chain"]}
                                  for n, p in profiles.items() if not n.startswith("fused")}, "conditions": {}}
    for cond in ("quiet", "hog"):
        t0 = time.perf_counter()
        if cond == "hog":
            with Hog(args.hog_procs, max_s=args.hog_max_s):
                out = run_condition(bundle, x, y, rows, profiles, deadlines, margin, args.priority, ncpu, args.block)
        else:
            out = run_condition(bundle, x, y, rows, profiles, deadlines, margin, args.priority, ncpu, args.block)
        result["conditions"][cond] = summarize(out, deadlines, profiles, stage_names, y is not None, margin,
                                               answer_p99, args.block, args.switch_in)
        result["conditions"][cond]["_seconds"] = time.perf_counter() - t0
        print(format_table(name, cond, result["conditions"][cond], requests, (lo, hi)), flush=True)
    return result


def format_table(model: str, cond: str, rows: dict[str, Any], n: int, rng: tuple[float, float]) -> str:
    lines = [f"{model}, {cond}: {n} batch-1 requests, deadlines {rng[0]:.3f}-{rng[1]:.3f} ms",
             "| row | misses all | misses counted | counted: stage 0 alone / went on / in a block's first requests "
             "| accuracy "
             "| mean stage | at deepest feasible | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f} %"
        mc = "none feasible" if r["miss_counted"] is None else f"{100 * r['miss_counted']:.2f} % (of {r['counted']})"
        label = {"fused": "plain fused session, every CPU (median fits)",
                 "fused1": "plain fused session, 1 thread (median fits)"}.get(name, name)
        feas = "—" if name.startswith("fused") else f"{100 * r['at_deepest_feasible']:.1f} %"
        why = f"{r['counted_misses_stage0']} / {r['counted_misses_went_on']} / {r['counted_misses_switch_in']}"
        lines.append(f"| {label} | {100 * r['miss_all']:.2f} % | {mc} | {why} | {acc} | {r['mean_stage']:.2f} | "
                     f"{feas} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
    return "\n".join(lines)


def alone(bundle: Path, x: np.ndarray, requests: int, gap_s: float, priority: int, runs: int) -> dict[str, Any]:
    """The real-time row by itself (1 thread): ``requests`` in blocks of 100 with ``gap_s``
    idle seconds between blocks; misses in all and at each block's first request."""
    from kdedge.runtime import Deadline, Runner

    row = Row("alone", 1, realtime=True)
    prof = profile_row(bundle, row, runs, priority)
    lo, hi = prof.stat("stage0", 1, "p99"), prof.stat("chain", 1, "p99")
    deadlines = np.random.default_rng(0).uniform(lo, hi, requests)
    pol = Deadline(1.0)
    miss = np.zeros(requests, bool)
    longest = np.zeros(requests)
    with Runner(bundle, threads=1, profile=prof, realtime=_rt(priority)) as r:
        r.warmup()
        for i, d in enumerate(deadlines):
            if i % 100 == 0 and gap_s:
                time.sleep(gap_s)
            pol.deadline_ms = pol.budget_ms = float(d)
            res = r.run(x[i % len(x): i % len(x) + 1], pol)
            miss[i] = res.total_ms[0] > d
            longest[i] = max(res.stage_ms)
    first = np.arange(requests) % 100 == 0
    return {"gap_s": gap_s, "requests": requests, "misses": int(miss.sum()), "at_block_start": int((miss & first).sum()),
            "longest_stage_of_misses_ms": sorted(longest[miss].round(2).tolist())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,cifar")
    ap.add_argument("--requests", type=int, default=10_000, help="requests for the demo HNE")
    ap.add_argument("--cifar-requests", type=int, default=2_000, help="requests for the CIFAR HNE")
    ap.add_argument("--work", default="/tmp/kdedge-bench-contention")
    ap.add_argument("--epochs", type=int, default=3, help="demo HNE training epochs")
    ap.add_argument("--profile-runs", type=int, default=500)
    ap.add_argument("--margin-ms", type=float, default=0.1, help="deadline margin, CIFAR HNE (the policy's default)")
    ap.add_argument("--demo-margin-ms", type=float, default=0.1, help="deadline margin, demo HNE")
    ap.add_argument("--block", type=int, default=500, help="requests per row before the next row's turn")
    ap.add_argument("--switch-in", type=int, default=10, help="a block's first requests, counted apart in the table")
    ap.add_argument("--priority", type=int, default=50)
    ap.add_argument("--rt-threads", type=int, default=1, help="threads of the real-time rows")
    ap.add_argument("--hog-procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hog-max-s", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--alone-gaps", default=None, help="instead: the real-time row alone on the CIFAR HNE, one run "
                                                      "per idle gap between blocks, e.g. 0.05,0")
    args = ap.parse_args()
    if args.alone_gaps is not None:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        bundle, x, _ = cifar_bundle(work)
        for g in args.alone_gaps.split(","):
            print(json.dumps(alone(bundle, x, args.cifar_requests, float(g), args.priority, 300)), flush=True)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    from kdedge.device import device_id

    info = {"device": device_id(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "loadavg": os.getloadavg(), "args": vars(args),
            "online_cost_us": online_cost_us()}
    print(json.dumps(info), flush=True)
    results = []
    for name in args.models.split(","):
        if name == "demo":
            bundle, x, y = demo_bundle(work, args.epochs)
            results.append(bench_model("demo HNE (mnist5k, B=3)", bundle, x, y, args.requests, args, args.demo_margin_ms))
        elif name == "cifar":
            bundle, x, y = cifar_bundle(work)
            results.append(bench_model("CIFAR HNE (resnet, B=4, random weights)", bundle, x, y,
                                       args.cifar_requests, args, args.margin_ms))
        else:
            raise SystemExit(f"unknown model {name!r}; known: demo, cifar")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
