"""Benchmarks of the anytime runner (results in docs/runtime.md). Not a test: it times things.

1. Anytime overhead: all stages one by one vs the fused full graph, batch 1 and 32, through
   the runner (both paths pay the same per-call costs) and with plain ``session.run`` calls.
2. Runner overhead per stage over a plain ``session.run`` chain.
3. Deadlines: N requests (batch 1) with deadlines drawn uniformly between the time to stage
   0's answer and the time to the full answer: miss rate, share of requests at the deepest
   stage that would have fit, and accuracy vs deadline against the best single fixed-depth
   model (a fused prefix, budget mode) that meets the same deadline.
4. Confidence policy: accuracy vs mean MACs per sample over a threshold sweep (batch 32,
   samples leave the batch), against the fixed depths.

Usage:
    python bench/bench_runtime.py --bundle hne.kdedge --threads 2 --out /tmp/bench-runtime
    python bench/bench_runtime.py --toy            # a small toy bundle, minutes less

Without --bundle it trains the demo HNE recipe (configs/hne_mnist_demo.yaml) and exports it,
or with --toy the three-stage toy model of the tests (needs the train extra).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    import onnxruntime

    from kdedge.device import device_id
    from kdedge.targets.threads import default_threads

    try:
        load = [round(v, 2) for v in __import__("os").getloadavg()]
    except OSError:
        load = None
    return {"device": device_id(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "cpus": default_threads(),
            "loadavg_at_start": load}


# ---------------------------------------------------------------------------------------------
# bundles and data


def make_bundle(out: Path, toy: bool, epochs: int | None) -> Path:
    """Train and export the demo HNE (or the test toy) into ``out``."""
    if toy:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers_anytime import ToyAnytime, digits_data, train_toy

        from kdedge.export import export

        xtr, ytr, xv, yv, info = digits_data()
        model = train_toy(ToyAnytime(), xtr, ytr, epochs=6)
        return export(model, out / "toy.kdedge", info=info, val_data=(xv, yv), exporter="legacy", force=True)
    from kdedge.config import read_yaml, resolve, set_key
    from kdedge.export import export_run
    from kdedge.train.engine import fit

    raw = read_yaml(ROOT / "configs" / "hne_mnist_demo.yaml")
    if epochs is not None:
        set_key(raw, "train.epochs", epochs)
    run = out / "hne-run"
    if not (run / "run.json").exists():
        fit(resolve(raw), run)
    return export_run(run, out / "hne.kdedge", force=True)


def test_data(bundle: Any, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's dataset's test split, raw images preprocessed by the bundle's own rule."""
    from kdedge.bundle.input_files import preprocess
    from kdedge.train.data import DataConfig, load_data

    name = bundle.preprocessing["dataset"]
    ds = load_data(DataConfig(name=name), 0).test
    n = len(ds) if limit is None else min(limit, len(ds))
    x = preprocess(np.stack([ds.raw(i) for i in range(n)]), bundle)
    return x, np.asarray(ds.targets[:n], np.int64)


# ---------------------------------------------------------------------------------------------
# 1-2: overhead


def bench_overhead(runner: Any, x_all: np.ndarray, batches: tuple[int, ...], rounds: dict[int, int]) -> dict[str, Any]:
    import onnxruntime as ort

    from kdedge.runtime import Fixed, Full

    b = runner.bundle
    so = runner.options.session_options()
    stages = [(ort.InferenceSession(str(b.file(e, "onnx")), so, providers=["CPUExecutionProvider"]),
               [o.tensor for o in e.outputs], [i.tensor for i in e.inputs]) for e in b.stages]
    fused_entry = b.prefixes[-1] if b.prefixes and b.prefixes[-1].last_stage == len(b.stages) - 1 else None
    fused = None if fused_entry is None else ort.InferenceSession(str(b.file(fused_entry, "onnx")), so,
                                                                  providers=["CPUExecutionProvider"])
    S = len(stages)
    full, fixed = Full(), Fixed(S, fused=True)
    out: dict[str, Any] = {"fused_graph": None if fused_entry is None else fused_entry.name}
    for n in batches:
        x = np.ascontiguousarray(x_all[:n])

        def raw_chain() -> None:
            feeds = {"input": x}
            for sess, outs, ins in stages:
                feeds.update(zip(outs, sess.run(outs, {t: feeds[t] for t in ins})))

        def raw_fused() -> None:
            fused.run([fused_entry.logits_tensor], {"input": x})  # type: ignore[union-attr]

        fns = {"raw_chain": raw_chain, "runner_stages": lambda: runner.run(x, full)}
        if fused is not None:
            fns.update({"raw_fused": raw_fused, "runner_fused": lambda: runner.run(x, fixed)})
        times: dict[str, list[float]] = {k: [] for k in fns}
        per_stage_raw: list[list[float]] = [[] for _ in range(S)]

        def raw_per_stage() -> None:
            feeds = {"input": x}
            for j, (sess, outs, ins) in enumerate(stages):
                t = time.perf_counter()
                vals = sess.run(outs, {t_: feeds[t_] for t_ in ins})
                per_stage_raw[j].append((time.perf_counter() - t) * 1e6)
                feeds.update(zip(outs, vals))

        # alternating blocks: each path runs in steady state (calls interleaved one by one evict
        # each other's weights and inflate every path ~1.8x here), while drift and other load
        # still hit every path alike across the blocks
        blocks = 20
        per_block = max(1, rounds[n] // blocks)
        for _ in range(blocks):
            for k, fn in fns.items():
                for _ in range(max(2, per_block // 10)):
                    fn()
                for _ in range(per_block):
                    t = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t) * 1e6)
            for _ in range(max(1, per_block // 10)):
                raw_per_stage()
        med = {k: float(np.median(v)) for k, v in times.items()}
        row: dict[str, Any] = {f"{k}_us": v for k, v in med.items()}
        row["raw_stage_us"] = [float(np.median(v)) for v in per_stage_raw]
        if fused is not None:
            row["ratio_runner"] = med["runner_stages"] / med["runner_fused"]
            row["ratio_raw"] = med["raw_chain"] / med["raw_fused"]
            row["ratio_runner_stages_vs_raw_fused"] = med["runner_stages"] / med["raw_fused"]
        row["runner_overhead_per_stage_us"] = (med["runner_stages"] - med["raw_chain"]) / S
        row["rounds"] = rounds[n]
        out[str(n)] = row
    return out


# ---------------------------------------------------------------------------------------------
# 3: deadlines


class Recorder:
    """A user policy: full, recording the time before each stage (the answer-ready time of the one before)."""

    name, budget_ms, needs_profile = "recorder", None, False

    def __init__(self) -> None:
        self.before: list[float] = []

    def decide(self, ctx: Any) -> Any:
        from kdedge.runtime import CONTINUE

        if ctx.stage > 0:
            self.before.append(ctx.elapsed_ms)
        return CONTINUE


def answer_times(runner: Any, x: np.ndarray, runs: int) -> np.ndarray:
    """[runs, S]: time from the request start until the answer after stage k is ready (batch 1)."""
    S = runner.num_stages
    out = np.empty((runs, S))
    for r in range(runs):
        rec = Recorder()
        res = runner.run(x[r % len(x): r % len(x) + 1], rec)
        total = float(res.total_ms[0])
        tail = total - (rec.before[-1] + res.stage_ms[-1]) if S > 1 else 0.0  # combine + result, after a stage
        out[r, : S - 1] = np.asarray(rec.before) + tail
        out[r, S - 1] = total
    return out


def fixed_options(runner: Any, x: np.ndarray, y: np.ndarray, runs: int) -> list[dict[str, Any]]:
    """Each fixed depth as a single model: its p99 latency (batch 1) and test accuracy."""
    from kdedge.runtime import Fixed

    opts = []
    for k in range(1, runner.num_stages + 1):
        pol = Fixed(k, fused=True)
        lat = [float(runner.run(x[r % len(x): r % len(x) + 1], pol).total_ms[0]) for r in range(runs)]
        correct = runner.run(x, pol).labels == y
        graph = runner.run(x[:1], pol).graphs
        opts.append({"stages": k, "graph": "+".join(graph), "p99_ms": float(np.percentile(lat, 99, method="inverted_cdf")),
                     "median_ms": float(np.median(lat)), "accuracy": float(correct.mean()), "correct": correct})
    return opts


def bench_deadlines(runner: Any, x: np.ndarray, y: np.ndarray, requests: int, margin_ms: float, seed: int,
                    stats: tuple[str, ...], png: Path | None) -> dict[str, Any]:
    """The same requests and deadlines under the deadline policy with each profile statistic."""
    from kdedge.runtime import Deadline, Fixed

    S = runner.num_stages
    ready = answer_times(runner, x, 1000)
    cum_med = np.median(ready, axis=0)
    cum_p99 = np.percentile(ready, 99, axis=0, method="inverted_cdf")
    lo, hi = float(cum_med[0]), float(cum_med[-1])
    stage_correct = np.stack([runner.run(x, Fixed(k, fused=False)).labels == y for k in range(1, S + 1)])
    fixed = fixed_options(runner, x, y, 1000)
    rng = np.random.default_rng(seed)
    deadlines = rng.uniform(lo, hi, size=requests)
    counted = deadlines >= cum_p99[0]  # deadlines that stage 0 itself meets (99 % of the time)
    deepest = np.array([int(np.flatnonzero(cum_med <= d).max()) if (cum_med <= d).any() else -1 for d in deadlines])
    feasible = deepest >= 0
    # the best single fixed depth that meets each deadline (its p99, or its median, fits), and
    # its answer (no answer in time counts as wrong)
    fixed_correct = {s_: np.zeros(requests, bool) for s_ in ("p99", "median")}
    fixed_ok = {s_: np.zeros(requests, bool) for s_ in ("p99", "median")}
    for s_ in ("p99", "median"):
        for r, d in enumerate(deadlines):
            fits = [f for f in fixed if f[f"{s_}_ms"] <= d]
            if fits:
                best = max(fits, key=lambda f: (f["accuracy"], -f[f"{s_}_ms"]))
                fixed_correct[s_][r] = best["correct"][r % len(x)]
                fixed_ok[s_][r] = True
    edges = np.linspace(lo, hi, 11)
    bins = [(deadlines >= a) & (deadlines < b) for a, b in zip(edges[:-1], edges[1:])]
    result: dict[str, Any] = {
        "requests": requests, "margin_ms": margin_ms, "deadline_range_ms": [lo, hi],
        "answer_ready_median_ms": cum_med.tolist(), "answer_ready_p99_ms": cum_p99.tolist(),
        "counted": int(counted.sum()), "mean_deepest_feasible": float(deepest[feasible].mean()),
        # the floor no policy can beat: plain full requests that the machine delayed by more
        # than 50 µs / 1 ms beyond their median (preemption by other processes)
        "full_requests_delayed_50us": float((ready[:, -1] > cum_med[-1] + 0.05).mean()),
        "full_requests_delayed_1ms": float((ready[:, -1] > cum_med[-1] + 1.0).mean()),
        "stage0_answers_delayed_50us": float((ready[:, 0] > cum_med[0] + 0.05).mean()),
        "stage_accuracy": stage_correct.mean(axis=1).tolist(),
        "fixed": [{k: v for k, v in f.items() if k != "correct"} for f in fixed],
        "fixed_accuracy": {s_: float(v.mean()) for s_, v in fixed_correct.items()},
        "fixed_answered": {s_: float(v.mean()) for s_, v in fixed_ok.items()},
        "curve_deadline_ms": [float((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])],
        "curve_fixed_accuracy": {s_: [float(v[m].mean()) if m.any() else None for m in bins]
                                 for s_, v in fixed_correct.items()},
        "policies": {},
    }
    for spec in stats:  # "p99", "median+watchdog" (armed for every stage), "median+fused" (budget mode)
        stat, _, extra = spec.partition("+")
        kw: dict[str, Any] = {"watchdog": {"watchdog_min_ms": 0.0}, "fused": {"fused": True}, "": {}}[extra]
        stage = np.empty(requests, np.int64)
        total = np.empty(requests)
        correct = np.empty(requests, bool)
        was_aborted = np.zeros(requests, bool)
        for r, d in enumerate(deadlines):
            i = r % len(x)
            res = runner.run(x[i: i + 1], Deadline(float(d), margin_ms=margin_ms, stat=stat, **kw))
            stage[r], total[r] = res.stage[0], res.total_ms[0]
            correct[r] = res.labels[0] == y[i]
            was_aborted[r] = res.aborted is not None
        miss = total > deadlines
        went_on = (stage > 0) | was_aborted  # the policy chose to run past stage 0
        result["policies"][spec] = {
            "miss_rate_all": float(miss.mean()),
            "miss_rate_counted": float(miss[counted].mean()) if counted.any() else None,
            # late answers after the policy chose to go on (stage 0 alone late is not the policy's)
            "miss_rate_policy": float((miss & went_on).mean()),
            "miss_rate_stage0_late": float((miss & ~went_on).mean()),
            "aborted": int(was_aborted.sum()),
            "at_deepest_feasible": float((stage[feasible] >= deepest[feasible]).mean()),
            "above_deepest_feasible": float((stage[feasible] > deepest[feasible]).mean()),
            "mean_stage": float(stage.mean()), "accuracy": float(correct.mean()),
            "latency_ms": {"p50": float(np.median(total)), "p99": float(np.percentile(total, 99, method="inverted_cdf"))},
            "curve_accuracy": [float(correct[m].mean()) if m.any() else None for m in bins],
            "curve_miss_rate": [float(miss[m].mean()) if m.any() else None for m in bins],
            "curve_mean_stage": [float(stage[m].mean()) if m.any() else None for m in bins],
        }
    if png is not None:
        plot_deadlines(result, png, runner.bundle.family)
    return result


def plot_deadlines(res: dict[str, Any], png: Path, family: str) -> None:
    """Three panels over the deadline: accuracy, mean stage reached, miss rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = res["curve_deadline_ms"]
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 8), dpi=110, sharex=True)
    pct = lambda v: [None if a is None else 100 * a for a in v]  # noqa: E731
    for spec, pol in res["policies"].items():
        axes[0].plot(xs, pct(pol["curve_accuracy"]), "o-", ms=3, label=f"runner, deadline ({spec})")
        axes[1].plot(xs, pol["curve_mean_stage"], "o-", ms=3, label=f"runner, deadline ({spec})")
        axes[2].plot(xs, pct(pol["curve_miss_rate"]), "o-", ms=3, label=f"runner, deadline ({spec})")
    for s_, curve in res["curve_fixed_accuracy"].items():
        axes[0].plot(xs, pct(curve), "s--", ms=3, label=f"best fixed depth whose {s_} fits (none: wrong)")
    acc = [100 * a for a in res["stage_accuracy"]]
    axes[0].set_ylim(min(acc) - 1.5, max(acc) + 1.0)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].set_ylabel("mean stage reached")
    axes[2].set_ylabel("deadline misses (%)")
    axes[2].set_xlabel("deadline (ms)")
    for ax in axes:
        for k, t in enumerate(res["answer_ready_median_ms"]):
            ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    for k, t in enumerate(res["answer_ready_median_ms"]):
        axes[1].annotate(f"stage {k} ready (median)", (t, 0), fontsize=6, rotation=90, va="bottom")
    axes[0].legend(fontsize=6, loc="lower right")
    axes[0].set_title(f"{family}: {res['requests']} requests at batch 1, deadlines uniform between the stage-0 "
                      f"and the full answer time", fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 4: confidence


def bench_confidence(runner: Any, x: np.ndarray, y: np.ndarray, batch: int, png: Path | None) -> dict[str, Any]:
    from kdedge.runtime import Confidence, Fixed

    b = runner.bundle
    cum_macs = np.cumsum([e.macs for e in b.stages])
    fixed = []
    for k in range(1, runner.num_stages + 1):
        acc = float((runner.run(x, Fixed(k, fused=False)).labels == y).mean())
        fixed.append({"stages": k, "accuracy": acc, "mean_macs": float(cum_macs[k - 1])})
    points = []
    for th in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999):
        ev = runner.evaluate(x, y, Confidence(th), batch=batch)
        counts = np.asarray(ev["stage_counts"])
        points.append({"threshold": th, "accuracy": ev["accuracy"], "mean_stage": ev["mean_stage"],
                       "mean_macs": float((counts * cum_macs).sum() / counts.sum()), "stage_counts": counts.tolist(),
                       "ms_per_batch_p50": ev["latency_ms"]["p50"]})
    result = {"batch": batch, "fixed": fixed, "thresholds": points}
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([p["mean_macs"] / 1e6 for p in points], [100 * p["accuracy"] for p in points], "o-",
                label="confidence policy (threshold sweep)")
        ax.plot([p["mean_macs"] / 1e6 for p in fixed], [100 * p["accuracy"] for p in fixed], "s--",
                label="fixed depth (all samples)")
        ax.set_xlabel("mean MMACs per sample")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{b.family}: budgeted batch classification (batch {batch})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
    return result


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="an exported bundle (default: train and export one)")
    ap.add_argument("--toy", action="store_true", help="use the tests' toy model instead of the demo HNE")
    ap.add_argument("--epochs", type=int, help="epochs when training the demo HNE (default: the recipe's)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kdedge-bench-runtime"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--margin-ms", type=float, default=0.1)
    ap.add_argument("--stats", default="p99,p90,median,median+watchdog,p99+fused,median+fused",
                    help="profile statistics the deadline policy is run with (+watchdog: armed for every "
                         "stage; +fused: budget mode through the fused prefixes)")
    ap.add_argument("--test-limit", type=int, default=1000)
    ap.add_argument("--rounds1", type=int, default=3000, help="timed rounds at batch 1")
    ap.add_argument("--rounds32", type=int, default=300, help="timed rounds at batch 32")
    ap.add_argument("--profile-runs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from kdedge.profile.latency import profile_bundle
    from kdedge.runtime import Runner, open_bundle

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    path = args.bundle or make_bundle(args.out, args.toy, args.epochs)
    bundle = open_bundle(path)
    x, y = test_data(bundle, args.test_limit)
    prof, prof_path, _ = profile_bundle(path, batches=(1, 32), runs=args.profile_runs, warmup=30, threads=args.threads)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine(), "bundle": str(path),
                              "family": bundle.family, "stages": len(bundle.stages),
                              "members": [e.members_total for e in bundle.stages],
                              "macs": [e.macs for e in bundle.stages], "profile": str(prof_path)}
    with Runner(path, threads=args.threads) as runner:
        result["threads"] = runner.threads
        runner.warmup((1, 32), runs=20)
        print(f"bundle {path} ({bundle.family}, {len(bundle.stages)} stages), {runner.threads} thread(s)", flush=True)
        result["overhead"] = bench_overhead(runner, x, (1, 32), {1: args.rounds1, 32: args.rounds32})
        print(json.dumps(result["overhead"], indent=1), flush=True)
        # the same at onnxruntime's "extended" level (no NCHWc layout transformation): where the
        # gap between stage graphs and the fused graph comes from
        with Runner(path, threads=args.threads, optimization="extended") as ext:
            ext.warmup((1, 32), runs=20)
            result["overhead_extended"] = bench_overhead(ext, x, (1, 32), {1: args.rounds1 // 3,
                                                                            32: args.rounds32 // 3})
        print(json.dumps(result["overhead_extended"], indent=1), flush=True)
        result["deadlines"] = bench_deadlines(runner, x, y, args.requests, args.margin_ms, args.seed,
                                              tuple(args.stats.split(",")), args.out / "runtime-deadline.png")
        print(json.dumps(result["deadlines"], indent=1), flush=True)
        result["confidence"] = bench_confidence(runner, x, y, 32, args.out / "runtime-confidence.png")
        print(json.dumps(result["confidence"], indent=1), flush=True)
    result["seconds"] = time.time() - started
    (args.out / "bench_runtime.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'bench_runtime.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
