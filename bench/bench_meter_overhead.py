"""Overhead of a sampling power meter on the latency of a CPU workload.

A numpy matmul loop of a few milliseconds per iteration runs in short blocks without a meter
and with a sampling meter at each period, the order shuffled every round so that every condition
sees the same machine load; the meter samples on its background thread meanwhile. The overhead is
the ratio of median iteration latencies, minus one (goal: under 2 % at the default period).

The meter is the Jetson sysfs meter over a fake INA3221 tree written to a temporary directory
(3 rails, 6 attribute reads per sample), unless ``--rapl`` is given and RAPL counters are
readable here. A fake tree is read from the page cache: a real INA3221 read is an I2C
transaction in the kernel, slower, but spent outside the GIL (``os.pread`` releases it).

Usage:
    .venv/bin/python bench/bench_meter_overhead.py                # default period, 0.002 and 0.05 s
    .venv/bin/python bench/bench_meter_overhead.py --periods 0.01 --rounds 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _blas_threads_from_argv() -> str:
    # BLAS reads its thread count when numpy is imported, so this is decided before the import.
    if "--blas-threads" in sys.argv:
        return sys.argv[sys.argv.index("--blas-threads") + 1]
    return "1"


for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _blas_threads_from_argv()

import numpy as np  # noqa: E402

from kdedge.profile.power import DEFAULT_PERIOD_S, JetsonSysfsMeter, Meter, NoneMeter, RaplMeter  # noqa: E402

FAKE_RAILS = {"VDD_IN": (5072, 1120), "VDD_CPU_GPU_CV": (5064, 208), "VDD_SOC": (5064, 312)}


def fake_ina3221(root: Path) -> Path:
    hw = root / "1-0040" / "hwmon" / "hwmon1"
    hw.mkdir(parents=True)
    for n, (label, (mv, ma)) in enumerate(FAKE_RAILS.items(), 1):
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    return root


def block(a: np.ndarray, b: np.ndarray, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        out.append(time.perf_counter() - t)
    return out


def calibrate(target_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """Square float32 matrices whose product takes about ``target_ms`` (median of 15 runs)."""
    n = 64
    while True:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        ms = statistics.median(block(a, a, 15)) * 1e3
        if ms >= target_ms or n >= 4096:
            return a, a.copy()
        n = int(n * max(1.05, min(1.5, (target_ms / max(ms, 1e-3)) ** (1 / 3))))


def measure(meters: dict[str, Meter], a: np.ndarray, b: np.ndarray, rounds: int, iters: int) -> dict[str, dict]:
    """Blocks of ``iters`` iterations without a meter and with each meter, in a shuffled order
    every round, so that all conditions see the same (possibly changing) machine load."""
    rng = random.Random(0)
    lat: dict[str | None, list[float]] = {None: [], **{k: [] for k in meters}}
    readings: dict[str, list] = {k: [] for k in meters}
    conditions: list[str | None] = [None, *meters]
    for _ in range(rounds):
        rng.shuffle(conditions)
        for cond in conditions:
            if cond is None:
                lat[None] += block(a, b, iters)
            else:
                meters[cond].start()
                lat[cond] += block(a, b, iters)
                readings[cond].append(meters[cond].stop())
    p90 = lambda xs: statistics.quantiles(xs, n=10)[-1]  # noqa: E731
    base = lat[None]
    out = {}
    for key in meters:
        xs = lat[key]
        periods = [r.period_s for r in readings[key] if r.period_s]
        out[key] = {
            "median_ms_without": statistics.median(base) * 1e3,
            "median_ms_with": statistics.median(xs) * 1e3,
            "overhead_pct": (statistics.median(xs) / statistics.median(base) - 1) * 100,
            "p90_overhead_pct": (p90(xs) / p90(base) - 1) * 100,
            "mean_overhead_pct": (statistics.fmean(xs) / statistics.fmean(base) - 1) * 100,
            "actual_period_ms": statistics.median(periods) * 1e3 if periods else None,
            "samples_per_window": statistics.median(r.samples for r in readings[key]),
            "iterations_each": len(xs),
        }
    return out


def cpu_share(meter: Meter, seconds: float = 2.0) -> tuple[float, float]:
    """CPU time the meter's thread uses while the main thread sleeps: (µs per sample, % of a core).

    CPU time, unlike wall time, does not depend on what else the machine runs, so this bounds
    the overhead on a workload that saturates every core.
    """
    c0 = time.process_time()
    meter.start()
    time.sleep(seconds)
    reading = meter.stop()
    used = time.process_time() - c0
    return used / max(reading.samples, 1) * 1e6, used / reading.seconds * 100


def read_cost_us(meter: JetsonSysfsMeter, n: int = 2000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        meter._read()
    return (time.perf_counter() - t) / n * 1e6


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--periods", type=float, nargs="+", default=[DEFAULT_PERIOD_S, 0.002, 0.05])
    ap.add_argument("--target-ms", type=float, default=2.0, help="latency of one workload iteration")
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--iters", type=int, default=10, help="iterations per block")
    ap.add_argument("--rapl", action="store_true", help="use RAPL counters instead of a fake rail tree")
    ap.add_argument(
        "--blas-threads",
        default="1",
        help="BLAS threads of the workload (1 leaves a core for the sampling thread; "
        "as many as cores measures a saturated machine)",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    a, b = calibrate(args.target_ms)
    with tempfile.TemporaryDirectory() as tmp:
        root = fake_ina3221(Path(tmp))
        probe = JetsonSysfsMeter(root=str(root))
        cost = read_cost_us(probe)
        probe.close()
        if args.rapl:
            meters: dict[str, Meter] = {"rapl": RaplMeter()}
        else:
            meters = {f"{p:g}": JetsonSysfsMeter(root=str(root), period_s=p) for p in args.periods}
        if not args.rapl and DEFAULT_PERIOD_S in args.periods:
            # The same meter without SCHED_BATCH, to show what that choice buys.
            plain = JetsonSysfsMeter(root=str(root), period_s=DEFAULT_PERIOD_S)
            plain.batch_scheduling = False
            meters[f"{DEFAULT_PERIOD_S:g}-no-batch"] = plain
        # A/A control: the "none" meter starts no thread and reads nothing, so its "overhead"
        # is the measurement noise on this machine at this moment.
        meters["control"] = NoneMeter("control")
        shares = {
            key: cpu_share(m) for key, m in meters.items() if isinstance(m, JetsonSysfsMeter) and m.batch_scheduling
        }
        try:
            results = measure(meters, a, b, args.rounds, args.iters)
        finally:
            for m in meters.values():
                m.close()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, load average {load:.1f} at the end"
    )
    print(f"machine: {machine}")
    print(f"command: {' '.join([os.path.relpath(sys.executable)] + sys.argv)}")
    print(
        f"workload: float32 matmul {a.shape[0]}x{a.shape[0]}, BLAS threads {args.blas_threads}; "
        f"one sensor read (3 rails) = {cost:.1f} µs"
    )
    print()
    print(
        "| meter | period (ms) | actual period (ms) | median without (ms) | median with (ms) "
        "| overhead (median) | overhead (p90) |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key == "control":
            name, period = "none (A/A control: noise)", "-"
        elif key.endswith("-no-batch"):
            name, period = "jetson-sysfs (fake tree), without SCHED_BATCH", f"{float(key[:-9]) * 1e3:g}"
        else:
            name = "rapl" if args.rapl else "jetson-sysfs (fake tree)"
            period = "counter" if args.rapl else f"{float(key) * 1e3:g}"
        actual = "-" if r["actual_period_ms"] is None else f"{r['actual_period_ms']:.2f}"
        print(
            f"| {name} | {period} | {actual} | {r['median_ms_without']:.3f} | {r['median_ms_with']:.3f} "
            f"| {r['overhead_pct']:+.2f} % | {r['p90_overhead_pct']:+.2f} % |"
        )
    print()
    print("| meter | period (ms) | CPU per sample (µs) | CPU share (% of one core) |")
    print("|---|---|---|---|")
    for key, (per_sample, pct) in shares.items():
        print(f"| jetson-sysfs (fake tree) | {float(key) * 1e3:g} | {per_sample:.1f} | {pct:.2f} % |")
    if args.json:
        doc = {"machine": machine, "matmul_n": a.shape[0], "read_us": cost, "results": results, "cpu": shares}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
