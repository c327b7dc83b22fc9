"""Requests after idle time: what a request costs when the runner has been idle before it, and
what that does to deadlines when requests come at a steady rate (a camera at 30 fps leaves about
33 ms between frames). Results in docs/runtime.md. Not a test: it times things.

Part 1, cost after idle: a real-time runner (1 thread) runs the whole chain after an idle gap of
0, 1, 5, 33 and 100 ms, the gaps taking turns request by request, each gap once with the CPU
wake-up latency request held (``--cpu-latency 0``, the default of ``--realtime``) and once
without, alternating. Columns: median / p90 of the request and of stage 0.

Part 2, steady rate: one request every ``--period-ms``. Two real-time profiles: back to back
(``kdedge profile``'s default) and at that rate (``kdedge profile --idle-ms PERIOD``). Deadlines
are uniform between stage 0's p99 and the chain's p99 of the profile at that rate (deadlines a
request arriving at that rate can meet; ``--deadlines back-to-back`` draws them from the other
profile instead). Rows: ``--realtime`` planning with the back-to-back profile,
``--realtime --online`` (that profile times the recent load factor), and ``--realtime`` planning
with the profile at that rate, taking turns request by request. Columns: misses (all, and
counted: deadlines at least stage 0's p99 at that rate), mean stage, p50/p99.

    .venv/bin/python bench/bench_idle.py --json /tmp/idle.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

GAPS_MS = (0.0, 1.0, 5.0, 33.0, 100.0)


def _models(names: list[str], work: Path, epochs: int) -> dict[str, tuple[Path, np.ndarray]]:
    from bench_contention import cifar_bundle, demo_bundle

    out = {}
    for name in names:
        if name == "demo":
            path, x, _ = demo_bundle(work, epochs)
            out["demo HNE (mnist5k, B=3)"] = (path, x)
        elif name == "cifar":
            path, x, _ = cifar_bundle(work)
            out["CIFAR HNE (resnet, B=4, random weights)"] = (path, x)
        else:
            raise SystemExit(f"unknown model {name!r}; known: demo, cifar")
    return out


def after_idle(path: Path, x: np.ndarray, rounds: int, priority: int) -> list[dict[str, Any]]:
    from kdedge.runtime import Full, Runner
    from kdedge.runtime.realtime import CpuLatencyHold, Realtime, set_normal

    res: dict[tuple[float, bool], list[tuple[float, float]]] = {(g, q): [] for g in GAPS_MS for q in (True, False)}
    # the runner holds no latency request itself: the benchmark holds one for half the requests
    with Runner(path, threads=1, realtime=Realtime(priority=priority, cpu_latency_us=None)) as r:
        r.warmup()
        for i in range(rounds):
            for q in ((True, False) if i % 2 == 0 else (False, True)):
                for g in GAPS_MS:
                    with CpuLatencyHold(0) if q else contextlib.nullcontext():
                        if g:
                            time.sleep(g / 1e3)
                        out = r.run(x[i % len(x): i % len(x) + 1], Full())
                    res[(g, q)].append((float(out.total_ms[0]), float(out.stage_ms[0])))
    set_normal(0)
    rows = []
    for (g, q), v in res.items():
        a = np.array(v)
        rows.append({"gap_ms": g, "cpu_latency": "0" if q else "off", "n": len(a),
                     "total_median_ms": float(np.median(a[:, 0])), "total_p90_ms": float(np.percentile(a[:, 0], 90)),
                     "stage0_median_ms": float(np.median(a[:, 1])), "stage0_p90_ms": float(np.percentile(a[:, 1], 90))})
    return rows


def steady_rate(path: Path, x: np.ndarray, requests: int, period_ms: float, priority: int,
                profile_runs: int, seed: int, deadlines_from: str = "at-rate") -> dict[str, Any]:
    from kdedge.profile.latency import measure_profile
    from kdedge.runtime import Deadline, Runner
    from kdedge.runtime.realtime import Realtime, set_normal, set_thread

    cfg = Realtime(priority=priority)
    prof = measure_profile(path, batches=(1,), runs=profile_runs, warmup=50, threads=1, realtime=cfg)
    set_normal(0)
    at_rate = measure_profile(path, batches=(1,), runs=profile_runs, warmup=50, threads=1, realtime=cfg,
                              idle_ms=period_ms)
    set_normal(0)
    ref = at_rate if deadlines_from == "at-rate" else prof
    lo, hi = float(ref.stat("stage0", 1, "p99")), float(ref.stat("chain", 1, "p99"))
    feasible = float(at_rate.stat("stage0", 1, "p99"))
    deadlines = np.random.default_rng(seed).uniform(lo, hi, requests)
    rows = {"--realtime (profile back to back)": (prof, Deadline(1.0)),
            "--realtime --online (profile back to back)": (prof, Deadline(1.0, online=True)),
            f"--realtime (profile --idle-ms {period_ms:g})": (at_rate, Deadline(1.0))}
    out = {n: {"total": np.zeros(requests), "stage": np.zeros(requests, np.int64)} for n in rows}
    runners = {}
    for name, (p, _) in rows.items():
        runners[name] = Runner(path, threads=1, profile=p, realtime=cfg)
        set_thread(0, runners[name].realtime)
        runners[name].warmup()
        set_normal(0)
    try:
        set_thread(0, cfg)
        nxt = time.perf_counter()
        order = list(rows)
        for i, d in enumerate(deadlines):
            for name in (order if i % 2 == 0 else order[::-1]):
                pol = rows[name][1]
                nxt += period_ms / 1e3
                time.sleep(max(0.0, nxt - time.perf_counter()))
                pol.deadline_ms = pol.budget_ms = float(d)
                res = runners[name].run(x[i % len(x): i % len(x) + 1], pol)
                out[name]["total"][i], out[name]["stage"][i] = res.total_ms[0], res.stage[0]
    finally:
        for r in runners.values():
            r.close()
        set_normal(0)
    counted = deadlines >= feasible
    table = {}
    for name, o in out.items():
        miss = o["total"] > deadlines
        table[name] = {"misses": float(miss.mean()),
                       "misses_counted": float(miss[counted].mean()) if counted.any() else None,
                       "counted": int(counted.sum()), "mean_stage": float(o["stage"].mean()),
                       "p50_ms": float(np.median(o["total"])), "p99_ms": float(np.percentile(o["total"], 99, method="inverted_cdf"))}

    def stats(p: Any) -> dict[str, Any]:
        return {g: {"median": p.stat(g, 1, "median"), "p99": p.stat(g, 1, "p99")}
                for g in [*(s for s in p.graphs if s.startswith("stage")), "chain"]}

    return {"period_ms": period_ms, "requests": requests, "deadline_range_ms": [lo, hi],
            "deadlines_from": deadlines_from,
            "stage0_p99_at_rate_ms": feasible, "rows": table,
            "profile_ms": {"back_to_back": stats(prof), "at_rate": stats(at_rate)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,cifar")
    ap.add_argument("--rounds", type=int, default=150, help="requests per gap and latency setting (part 1)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per row at the steady rate (part 2)")
    ap.add_argument("--period-ms", type=float, default=33.0)
    ap.add_argument("--deadlines", choices=("at-rate", "back-to-back"), default="at-rate",
                    help="which profile's stage-0 and chain p99 bound the deadlines of part 2")
    ap.add_argument("--skip-after-idle", action="store_true", help="part 2 only")
    ap.add_argument("--profile-runs", type=int, default=500)
    ap.add_argument("--priority", type=int, default=50)
    ap.add_argument("--work", default="/tmp/kdedge-bench-contention")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from kdedge.device import device_id

    meta = {"device": device_id(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__, "loadavg": os.getloadavg(), "args": vars(args)}
    print(json.dumps(meta), flush=True)
    results: dict[str, Any] = {"meta": meta, "models": {}}
    for name, (path, x) in _models(args.models.split(","), Path(args.work), args.epochs).items():
        rows = [] if args.skip_after_idle else after_idle(path, x, args.rounds, args.priority)
        if rows:
            print(f"\n{name}: a request after an idle gap (real time, 1 thread, {args.rounds} requests each)")
            print("| idle before | --cpu-latency | request median / p90 ms | stage 0 median / p90 ms |")
            print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['gap_ms']:g} ms | {r['cpu_latency']} | {r['total_median_ms']:.3f} / {r['total_p90_ms']:.3f} | "
                  f"{r['stage0_median_ms']:.3f} / {r['stage0_p90_ms']:.3f} |")
        steady = steady_rate(path, x, args.requests, args.period_ms, args.priority, args.profile_runs, args.seed,
                             args.deadlines)
        lo, hi = steady["deadline_range_ms"]
        print(f"\n{name}: one request every {args.period_ms:g} ms, {args.requests} per row, deadlines "
              f"{lo:.3f}-{hi:.3f} ms ({args.deadlines} profile); stage 0 p99 at this rate {steady['stage0_p99_at_rate_ms']:.3f} ms")
        pb, pr = steady["profile_ms"]["back_to_back"], steady["profile_ms"]["at_rate"]
        print("profile medians back to back / at this rate: " + ", ".join(
            f"{g} {pb[g]['median']:.3f}/{pr[g]['median']:.3f}" for g in pb))
        print("| row | misses all / counted | mean stage | p50 / p99 ms |")
        print("|---|---|---|---|")
        for n, r in steady["rows"].items():
            mc = "none feasible" if r["misses_counted"] is None else f"{100 * r['misses_counted']:.2f} % (of {r['counted']})"
            print(f"| {n} | {100 * r['misses']:.2f} % / {mc} | {r['mean_stage']:.2f} | "
                  f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f} |")
        results["models"][name] = {"after_idle": rows, "steady_rate": steady}
        sys.stdout.flush()
    if args.json:
        from kdedge.io import atomic_write_text, dumps_strict

        atomic_write_text(args.json, dumps_strict(results, indent=1))


if __name__ == "__main__":
    main()
