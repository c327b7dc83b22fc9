"""Export benchmark: per model family, export time, bundle size, max error per stage, and FP32 vs
INT8 accuracy and latency per stage on onnxruntime CPU.

For every recipe it trains a run (or reuses a finished one), exports it twice (FP32 and INT8,
with the default gate of 1 point), and measures each stage file in isolation: batch 1 (and
batch 32), after warm-up, median and p90 of ``--runs`` calls, the stage's real inputs (carried
tensors computed by the earlier stages). Prints a table and writes JSON.

    .venv/bin/python bench/bench_export.py --epochs 3 --json bench/results/export.json

Recipes default to the three MNIST demos (HNE, AHBF-OKD, multi-exit MSDNet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

RECIPES = ["configs/hne_mnist_demo.yaml", "configs/ahbf_mnist_demo.yaml", "configs/multiexit_mnist_demo.yaml"]


def _train(recipe: str, run_dir: Path, epochs: int | None) -> None:
    from kdedge.config import load_config
    from kdedge.train.engine import fit

    status = run_dir / "run.json"
    if status.is_file() and json.loads(status.read_text()).get("status") == "finished":
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = ["train.device=cpu", *([f"train.epochs={epochs}"] if epochs else [])]
    fit(load_config(recipe, overrides), run_dir)


def _latency(bundles: dict[str, Path], x: np.ndarray, runs: int, threads: int) -> dict[str, list[dict[str, float]]]:
    """Per-graph latency (ms) of several bundles of one model, median and p90 over ``runs`` calls
    after warm-up. Calls to the bundles alternate, so that a busy machine slows them alike."""
    from kdedge.export.ortrun import OrtChain, RunGraph
    from kdedge.targets import open_bundle

    opened = {k: open_bundle(p) for k, p in bundles.items()}
    out: dict[str, list[dict[str, float]]] = {k: [] for k in bundles}
    for kind in ("stages", "prefixes"):
        chains = {k: OrtChain([RunGraph.from_entry(b, s) for s in getattr(b, kind)], threads=threads)
                  for k, b in opened.items()}
        feeds = {k: {"input": x} for k in bundles}
        n = len(next(iter(chains.values())).graphs)
        for i in range(n):
            calls = {}
            for k, chain in chains.items():
                g = chain.graphs[i]
                calls[k] = (chain.sessions[i], list(g.outputs), {t: feeds[k][t] for t in g.inputs})
                res = chain.sessions[i].run(*calls[k][1:])
                if kind == "stages":
                    feeds[k].update(zip(g.outputs, res))
            for _ in range(max(10, runs // 10)):
                for sess, names, feed in calls.values():
                    sess.run(names, feed)
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(runs):
                for k, (sess, names, feed) in calls.items():
                    t0 = time.perf_counter()
                    sess.run(names, feed)
                    times[k].append((time.perf_counter() - t0) * 1e3)
            for k, t in times.items():
                t.sort()
                out[k].append({"graph": chains[k].graphs[i].name, "median_ms": statistics.median(t),
                               "p90_ms": t[int(0.9 * (len(t) - 1))]})
    return out


def _bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_recipe(recipe: str, work: Path, epochs: int | None, runs: int, threads: int, calib: int) -> dict[str, Any]:
    from kdedge.export import ExportError, export_run
    from kdedge.targets import open_bundle
    from kdedge.train.run import load_trained

    name = Path(recipe).stem
    run_dir = work / "runs" / name
    t0 = time.perf_counter()
    _train(recipe, run_dir, epochs)
    train_s = time.perf_counter() - t0
    result: dict[str, Any] = {"recipe": recipe, "train_s": train_s}
    val = load_trained(run_dir).splits().val
    x1 = np.stack([val[i][0].numpy() for i in range(32)]).astype(np.float32)
    for precision in ("fp32", "int8"):
        out = work / "bundles" / f"{name}-{precision}.kdedge"
        t0 = time.perf_counter()
        gate = None
        try:
            export_run(run_dir, out, precision=precision, calib_size=calib, force=True)
        except ExportError as e:
            if precision != "int8":
                raise
            gate = e.summary  # the gate refused a stage: export again keeping it in FP32, and say so
            export_run(run_dir, out, precision=precision, calib_size=calib, force=True, int8_keep_fp32=True)
        export_s = time.perf_counter() - t0
        b = open_bundle(out)
        report = json.loads((out / "reports" / "verify.json").read_text())
        err = {g["name"]: max(o["max_abs"] for o in g["outputs"]) for g in report["graphs"]}
        result[precision] = {
            "export_s": export_s,
            "bytes": _bundle_bytes(out),
            "family": b.family,
            "rule": b.combine_default,
            "n_val": b.manifest["evaluation"]["n"],
            "stages": [{"graph": s.name, "members_total": s.members_total, "macs": s.macs,
                        "precision": s.files["onnx"].precision, "accuracy": s.accuracy[b.combine_default],
                        "max_abs_error_vs_torch": err[s.name]} for s in (*b.stages, *b.prefixes)],
            "fp32_graphs": (b.manifest["quantization"] or {}).get("fp32_graphs", []),
            "gate_failure": gate,
        }
    paths = {p: work / "bundles" / f"{name}-{p}.kdedge" for p in ("fp32", "int8")}
    for key, x, n in (("latency_b1", x1[:1], runs), ("latency_b32", x1, max(20, runs // 5))):
        for p, rows in _latency(paths, x, n, threads).items():
            result[p][key] = rows
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        f, q = r["fp32"], r["int8"]
        lines.append(f"{r['recipe']} (family {f['family']}, rule {f['rule']}, {f['n_val']} val images): "
                     f"export {f['export_s']:.1f} s FP32 / {q['export_s']:.1f} s INT8, bundle "
                     f"{f['bytes'] / 1024:.0f} KiB FP32 / {q['bytes'] / 1024:.0f} KiB INT8"
                     + (f", kept FP32: {', '.join(q['fp32_graphs'])}" if q["fp32_graphs"] else ""))
        if q.get("gate_failure"):
            lines.append(f"  INT8 gate without --int8-keep-fp32: {q['gate_failure']}")
        lines.append(f"  {'graph':<8} {'members':>7} {'MMACs':>7} {'max err':>9} {'acc fp32':>8} {'acc int8':>8} "
                     f"{'b1 fp32':>8} {'b1 int8':>8} {'b32 fp32':>9} {'b32 int8':>9}  (ms, median)")
        lat = {p: {k: {d['graph']: d for d in r[p][k]} for k in ("latency_b1", "latency_b32")} for p in ("fp32", "int8")}
        for sf, sq in zip(f["stages"], q["stages"]):
            g = sf["graph"]
            lines.append(
                f"  {g:<8} {sf['members_total']:>7} {sf['macs'] / 1e6:>7.2f} {sf['max_abs_error_vs_torch']:>9.2e} "
                f"{100 * sf['accuracy']:>7.2f}% {100 * sq['accuracy']:>7.2f}% "
                f"{lat['fp32']['latency_b1'][g]['median_ms']:>8.3f} {lat['int8']['latency_b1'][g]['median_ms']:>8.3f} "
                f"{lat['fp32']['latency_b32'][g]['median_ms']:>9.3f} {lat['int8']['latency_b32'][g]['median_ms']:>9.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--epochs", type=int, default=3, help="override train.epochs (0 = the recipe's)")
    ap.add_argument("--work", default="/tmp/kdedge-bench-export", help="runs and bundles go here")
    ap.add_argument("--runs", type=int, default=200, help="timed calls per graph at batch 1")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--calib", type=int, default=256, help="INT8 calibration images")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    work = Path(args.work)
    results = [bench_recipe(r, work, args.epochs or None, args.runs, args.threads, args.calib) for r in args.recipes]
    import onnxruntime
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
               "load_average": os.getloadavg()}
    print(json.dumps(machine))
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
