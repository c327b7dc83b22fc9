"""INT8 schemes on this CPU and on an emulated x86 CPU without VNNI: accuracy and speed.

onnxruntime's INT8 kernels on x86 without VNNI add pairs of uint8 x int8 products into a
saturating int16 (VPMADDUBSW), so the same INT8 file can be exact on one CPU and clip on another
(kdedge.export.quantize). For each demo recipe this trains a run (or reuses a finished one),
exports it once in FP32, quantizes every stage with each scheme (u8s7, s8s7, u8s8, s8s8; 256
calibration images evenly spaced over the training pool, each stage on its real inputs) and
measures:

- top-1 accuracy of every stage's own logits on the validation split, here and under
  ``qemu-x86_64 -cpu EPYC-Rome`` (AVX2, no AVX-512, no VNNI; needs ``apt install qemu-user``):
  the emulation runs the same onnxruntime, which then takes its AVX2 kernels;
- latency here: median of ``--runs`` batch-1 calls and ``--runs // 5`` batch-32 calls per stage
  (real inputs), FP32 and the four schemes interleaved call by call. Times under emulation mean
  nothing and are not taken.

    .venv/bin/python bench/bench_int8_schemes.py --epochs 3 --json /tmp/int8_schemes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_export import RECIPES, _train  # noqa: E402

SCHEMES = ("u8s7", "s8s7", "u8s8", "s8s8")
PROBE = Path(__file__).resolve().parent.parent / "tests" / "int8_probe.py"
CPU_MODEL = "EPYC-Rome"


def _evenly(n: int, k: int) -> np.ndarray:
    return np.linspace(0, n - 1, min(n, k)).round().astype(int)


def _images(ds: Any, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return np.stack([x.numpy() for x in xs]).astype(np.float32), np.array([int(y) for y in ys])


def _scheme_bundles(fp32: Path, work: Path, calib: np.ndarray) -> dict[str, Path]:
    """A copy of the FP32 bundle per scheme whose stage files are that scheme's INT8 files
    (prefixes dropped; the probe reads only the stages)."""
    from kdedge.export.ortrun import OrtChain, RunGraph
    from kdedge.export.quantize import quantize_file, stage_feeds
    from kdedge.targets import open_bundle

    b = open_bundle(fp32)
    chain = OrtChain([RunGraph.from_entry(b, s) for s in b.stages])
    out = {"fp32": fp32}
    for scheme in SCHEMES:
        dst = work / f"{fp32.stem}-{scheme}.kdedge"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(fp32, dst)
        for k, s in enumerate(b.stages):
            target = dst / s.files["onnx"].path
            tmp = target.with_name(target.stem + ".q.onnx")
            quantize_file(b.file(s, "onnx"), tmp, stage_feeds(chain, k, [(calib[i:i + 32], None)
                                                                          for i in range(0, len(calib), 32)]), scheme)
            os.replace(tmp, target)
        out[scheme] = dst
    return out


def _probe(bundle: Path, data: Path, emulate: bool) -> list[float] | None:
    cmd = [sys.executable, str(PROBE), str(bundle), str(data)]
    if emulate:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None or platform.machine() != "x86_64":
            return None
        cmd = [qemu, "-cpu", CPU_MODEL, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout)["accuracy"]


def _latency(bundles: dict[str, Path], x: np.ndarray, runs: int, threads: int) -> dict[str, list[float]]:
    """Median ms per stage for each bundle, calls interleaved across bundles."""
    from kdedge.export.ortrun import OrtChain, RunGraph
    from kdedge.targets import open_bundle

    chains = {}
    for k, p in bundles.items():
        b = open_bundle(p, verify=False)  # the scheme copies hold replaced files
        chains[k] = OrtChain([RunGraph.from_entry(b, s) for s in b.stages], threads=threads)
    n = len(next(iter(chains.values())).graphs)
    out: dict[str, list[float]] = {k: [] for k in bundles}
    feeds = {k: {"input": x} for k in bundles}
    for i in range(n):
        calls = {}
        for k, ch in chains.items():
            g = ch.graphs[i]
            calls[k] = (ch.sessions[i], list(g.outputs), {t: feeds[k][t] for t in g.inputs})
            feeds[k].update(zip(g.outputs, ch.sessions[i].run(*calls[k][1:])))
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
            out[k].append(statistics.median(t))
    return out


def bench_recipe(recipe: str, work: Path, epochs: int | None, runs: int, threads: int, calib_n: int) -> dict[str, Any]:
    from kdedge.export import export_run
    from kdedge.targets import open_bundle
    from kdedge.train.run import load_trained

    name = Path(recipe).stem
    run_dir = work / "runs" / name
    _train(recipe, run_dir, epochs)
    fp32 = work / "bundles" / f"{name}-fp32.kdedge"
    if not fp32.is_dir():
        export_run(run_dir, fp32, force=True)
    splits = load_trained(run_dir).splits()
    calib, _ = _images(splits.train, _evenly(len(splits.train), calib_n))
    xv, yv = _images(splits.val, np.arange(len(splits.val)))
    data = work / f"{name}-val.npz"
    np.savez(data, x=xv, y=yv)
    bundles = _scheme_bundles(fp32, work / "bundles", calib)
    stages = [s.name for s in open_bundle(fp32).stages]
    acc = {k: {"here": _probe(p, data, False), "no_vnni": _probe(p, data, True)} for k, p in bundles.items()}
    lat1 = _latency(bundles, xv[:1], runs, threads)
    lat32 = _latency(bundles, xv[:32], max(20, runs // 5), threads)
    return {"recipe": recipe, "stages": stages, "n_val": int(len(yv)), "accuracy": acc, "b1_ms": lat1, "b32_ms": lat32}


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['recipe']}: top-1 of each stage's own logits on {r['n_val']} val images; latency median ms",
             "| stage | scheme | acc here | acc no-VNNI (emulated) | b1 ms | b32 ms |", "|---|---|---|---|---|---|"]
    for i, st in enumerate(r["stages"]):
        for k in ("fp32", *SCHEMES):
            a = r["accuracy"][k]
            emu = "n/a" if a["no_vnni"] is None else f"{100 * a['no_vnni'][i]:.2f} %"
            lines.append(f"| {st} | {k} | {100 * a['here'][i]:.2f} % | {emu} | {r['b1_ms'][k][i]:.3f} | "
                         f"{r['b32_ms'][k][i]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--epochs", type=int, default=3, help="override train.epochs (0 = the recipe's)")
    ap.add_argument("--work", default="/tmp/kdedge-bench-int8", help="runs and bundles go here")
    ap.add_argument("--runs", type=int, default=200, help="timed calls per stage at batch 1")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--calib", type=int, default=256, help="calibration images")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    import onnxruntime

    from kdedge.cpu import int8_dot

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "int8_dot": int8_dot(),
               "onnxruntime": onnxruntime.__version__, "threads": args.threads, "load_average": os.getloadavg()}
    print(json.dumps(machine))
    results = []
    for recipe in args.recipes:
        r = bench_recipe(recipe, Path(args.work), args.epochs or None, args.runs, args.threads, args.calib)
        print(format_table(r), flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
