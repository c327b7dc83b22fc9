"""The runtime at the papers' model sizes (results in docs/performance.md). Not a test: it times
things.

Models (random weights, synthetic inputs of the real shapes):

- ``cifar-hne``: ``hne`` ``config: resnet, B: 4`` on 3×32×32, 100 classes (the bundle of
  ``bench/bench_contention.py``, made by its ``cifar_bundle``);
- ``mbv2-hne``: ``hne`` ``config: mobilenetv2, B: 2`` on 3×224×224, 1000 classes;
- ``msdnet``: ``msdnet`` ``config: cifar`` (11 exits) on 3×32×32, 100 classes;
- ``ahbf``: the AHBF ResNet-32 student (``ahbf`` ``backbone: resnet32``, deployed) on 3×32×32.

For each model:

1. **export**: ``kdedge.export.export`` in a child process: wall time and the child's peak
   resident memory (``ru_maxrss``). Bundles are kept under ``--work`` and reused (``--reexport``
   to redo; a reused bundle shows its first export's figures, marked ``cached``);
2. **open → first answer**: in fresh processes, ``Runner(bundle)`` until the first batch-1
   answer of every stage (import time listed apart);
3. **chain vs fused**, one process per thread count: batch 1 and 32 through the runner, the
   stage chain (``Full()``) against the fused full graph (``Fixed(S)``), in interleaved blocks;
   medians and their ratio (models without fused graphs: the chain alone);
4. **GFLOP/s**, in the same processes: every stage graph and the fused full graph alone in a
   plain onnxruntime session with the runner's options (its own carried inputs), against
   torchvision ``resnet18`` (224×224, 1.82 G MACs, dense convolutions: the reference) and
   ``mobilenet_v2`` ×1.4 (0.58 G, depth-wise separable like the HNE members) exported to ONNX
   and run the same way, same threads and batch, all graphs in interleaved rounds.
   GFLOP/s = 2 · MACs · batch / median time;
   With ``--unpadded``, models whose export padded grouped channels with zeros
   (``kdedge.export.pad``) are exported a second time with ``pad_channels=0``, and those graphs
   are timed in the same rounds (rows ``<graph> unpadded``);
5. **where the time goes**: the largest graph under onnxruntime's profiler, its kernel time per
   kind of operator (convolutions inside or outside onnxruntime's blocked NCHWc layout, layout
   conversions, concatenations, ...).

    .venv/bin/python bench/bench_paper_size.py                       # all models (exports: ~10 min)
    .venv/bin/python bench/bench_paper_size.py --models cifar-hne --quick   # smoke run, < 2 min once exported
    .venv/bin/python bench/bench_paper_size.py --json /tmp/paper-size.json
    .venv/bin/python bench/bench_paper_size.py --models mbv2-hne --unpadded --reexport   # padding's effect
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_WORK = Path("/tmp/kdedge-bench-paper-size")
_SHARED = False  # in a timing child: its sessions share one onnxruntime pool (a thread setting "2s")


@dataclass(frozen=True)
class Model:
    """A benchmark model: ``create_model(builder, num_classes=classes, ..., **kwargs)``."""

    builder: str
    kwargs: dict[str, Any]
    classes: int
    shape: tuple[int, int, int]
    about: str
    val: int = 64  # validation images for the export's verification


MODELS: dict[str, Model] = {
    "cifar-hne": Model("hne", {"config": "resnet", "B": 4}, 100, (3, 32, 32), "HNE ResNet (Table 2), B=4, 16 members"),
    "mbv2-hne": Model("hne", {"config": "mobilenetv2", "B": 2}, 1000, (3, 224, 224),
                      "HNE MobileNetV2 x1.4 (Table 3), B=2, 4 members", val=16),
    "msdnet": Model("msdnet", {"config": "cifar"}, 100, (3, 32, 32), "MSDNet CIFAR, 11 exits"),
    "ahbf": Model("ahbf", {"backbone": "resnet32", "branches": 4}, 100, (3, 32, 32), "AHBF ResNet-32 student"),
}


def _info(m: Model) -> dict[str, Any]:
    c = m.shape[0]
    return {"name": "synthetic", "num_classes": m.classes, "in_channels": c, "input_size": list(m.shape[1:]),
            "mean": [0.5] * c, "std": [0.25] * c, "scale": 1 / 255, "channel_order": "RGB",
            "class_names": [str(i) for i in range(m.classes)], "resize": None}


def bundle_path(work: Path, name: str, padded: bool = True) -> Path:
    """The bundle of ``name``; ``padded=False``: the same model exported with ``pad_channels=0``."""
    return work / (f"{name}.kdedge" if padded else f"{name}-unpadded.kdedge")


def padded_graphs(path: Path) -> list[str]:
    """Graphs of a bundle whose file export widened with zero channels (``padded_convs``)."""
    man = json.loads((path / "manifest.json").read_text())
    return [e["name"] for e in [*man["stages"], *man.get("prefixes", [])] if e["files"]["onnx"].get("padded_convs")]


def _inputs(m: Model, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *m.shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# children (each prints one JSON line last)


def calibrate_bn(model: Any, x: np.ndarray, batch: int = 16) -> None:
    """Set every BatchNorm's running statistics from ``x`` (a cumulative average over its
    batches, in train mode, no gradients), as training would leave them. With the fresh
    statistics of random weights (mean 0, variance 1) the features of deep dense networks grow
    layer after layer until float32 rounding differs between torch and onnxruntime beyond the
    export's tolerances; trained networks do not look like that."""
    import torch

    bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def child_export(name: str, work: Path, padded: bool = True) -> dict[str, Any]:
    """Export one model here (a fresh process): seconds (torch's import included, as a user's
    ``kdedge export`` pays it) and peak RSS. ``padded=False``: with ``pad_channels=0``."""
    import resource

    t0 = time.perf_counter()
    import torch

    path = bundle_path(work, name, padded)
    if name == "cifar-hne" and padded:
        from bench_contention import cifar_bundle  # the same bundle the contention benchmark uses

        got, _, _ = cifar_bundle(work)
        assert got == path, (got, path)
    else:
        from kdedge.export import export
        from kdedge.export.pad import BLOCK
        from kdedge.models import create_model

        m = MODELS[name]
        torch.manual_seed(0)
        model = create_model(m.builder, num_classes=m.classes, in_channels=m.shape[0], input_size=m.shape[1:],
                             **m.kwargs).eval()
        x = _inputs(m, m.val)
        calibrate_bn(model, _inputs(m, m.val, seed=5))
        export(model, path, info=_info(m), val_data=(x, np.zeros(m.val, np.int64)), force=True,
               pad_channels=BLOCK if padded else 0, progress=lambda msg: print(f"  [{name}] {msg}", file=sys.stderr, flush=True))
    return {"export_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_open(name: str, work: Path) -> dict[str, Any]:
    """Import, then open the bundle and answer one batch-1 request through every stage."""
    t0 = time.perf_counter()
    import onnxruntime  # noqa: F401  (counted in the import time: the runner imports it on first use)

    from kdedge.runtime import Full, Runner

    t1 = time.perf_counter()
    with Runner(bundle_path(work, name), threads=1) as r:
        x = np.zeros((1, *r.input_shape), np.float32)
        r.run(x, Full())
        t2 = time.perf_counter()
    return {"import_s": t1 - t0, "open_to_answer_s": t2 - t1}


def _timeit(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


# references: torchvision networks at 224², random weights; (builder, keyword arguments)
REFERENCES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("resnet18", {}),  # 1.82 G MACs: dense 3x3 convolutions, what the CPU kernels do best
    "mobilenet_v2_1.4": ("mobilenet_v2", {"width_mult": 1.4}),  # 0.58 G: depth-wise separable, as the HNE's
}


def reference_onnx(work: Path, name: str) -> tuple[Path, int]:
    """A reference network as ONNX with a dynamic batch (made once) and its MACs per image."""
    path, meta = work / f"{name}.onnx", work / f"{name}.json"
    if not (path.is_file() and meta.is_file()):
        import torch
        import torchvision

        from kdedge.io import atomic_write_text, dumps_strict
        from kdedge.models.flops import count_macs

        builder, kwargs = REFERENCES[name]
        torch.manual_seed(0)
        net = getattr(torchvision.models, builder)(weights=None, **kwargs).eval()
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(net, (torch.zeros(2, 3, 224, 224),), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=18)
        os.replace(tmp, path)
        atomic_write_text(meta, dumps_strict({"macs": count_macs(net, torch.zeros(1, 3, 224, 224))}))
    return path, int(json.loads(meta.read_text())["macs"])


def op_breakdown(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """Share of a graph's kernel time per kind of operator, from onnxruntime's profiler (the
    graph as onnxruntime optimised it, so convolutions it moved to its blocked NCHWc layout show
    as such, and so do the layout conversions around them)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from kdedge.targets.ort_session import OrtOptions

    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory() as tmp:
        so = OrtOptions(threads=threads, shared_pool=_SHARED).session_options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        weights = {t.name: tuple(t.dims) for t in graph.initializer}
        kind = {}
        for node in graph.node:
            k = node.op_type
            if k in ("Conv", "FusedConv"):
                w = weights.get(node.input[1], ())
                groups = next((a.i for a in node.attribute if a.name == "group"), 1)
                shape = "depth-wise" if len(w) == 4 and w[1] == 1 and groups > 1 else \
                    f"{w[2]}x{w[3]}" if len(w) == 4 else "?"
                grouped = " grouped" if groups > 1 and shape != "depth-wise" else ""
                where = "NCHWc" if node.domain == "com.microsoft.nchwc" else "NCHW (outside NCHWc)"
                k = f"conv {shape}{grouped}, {where}"
            elif k in ("ReorderInput", "ReorderOutput"):
                k = "layout conversion (Reorder*)"
            kind[node.name] = k
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            k = kind.get(ev["name"][: -len("_kernel_time")], ev.get("args", {}).get("op_name", "?"))
            total[k] = total.get(k, 0.0) + ev["dur"]
    whole = sum(total.values()) or 1.0
    return {k: v / whole for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def child_time(name: str, work: Path, threads: int, batches: list[int], quick: bool,
               shared: bool = False) -> dict[str, Any]:
    """Chain vs fused through the runner, then every graph alone against the references."""
    import onnxruntime as ort

    from kdedge.runtime import Fixed, Full, Runner
    from kdedge.targets import open_bundle
    from kdedge.targets.ort_session import OrtOptions

    m = MODELS[name]
    b = open_bundle(bundle_path(work, name))
    out: dict[str, Any] = {"threads": threads, "shared_pool": shared, "runner": {}, "graphs": {}}
    blocks, block_s, rounds, round_s = (3, 0.25, 3, 0.25) if quick else (10, 0.5, 7, 0.6)

    # 1. chain vs fused, interleaved blocks of about block_s seconds each
    with Runner(b.path, threads=threads, shared_pool=shared) as r:
        S, fused = r.num_stages, r.num_prefixes == r.num_stages
        policies = {"chain": Full(), **({"fused": Fixed(S, fused=True)} if fused else {})}
        for batch in batches:
            x = _inputs(m, batch, seed=1)
            r.warmup((batch,))
            # requests per block: about block_s seconds of each
            per = {k: max(1, int(block_s / max(_timeit(lambda p=p: r.run(x, p), 2), 1e-4)))
                   for k, p in policies.items()}
            times: dict[str, list[float]] = {k: [] for k in policies}
            for _ in range(blocks):
                for k, p in policies.items():
                    for _ in range(per[k]):
                        t0 = time.perf_counter()
                        r.run(x, p)
                        times[k].append((time.perf_counter() - t0) * 1e3)
            res = {k: float(np.median(v)) for k, v in times.items()}
            res["n"] = {k: len(v) for k, v in times.items()}
            out["runner"][str(batch)] = res

    # 2. every graph alone in a plain session with the runner's options, and the reference
    so = OrtOptions(threads=threads, shared_pool=shared).session_options()
    graphs = [*b.stages, *b.prefixes[-1:]]  # the stages and the fused full graph
    sess = {e.name: ort.InferenceSession(str(b.file(e, "onnx")), so, providers=["CPUExecutionProvider"])
            for e in graphs}
    # the same graphs exported without zero-padded channels, where export padded them (--unpadded)
    plain = bundle_path(work, name, padded=False)
    unpadded = {}
    if plain.is_dir():
        pb = open_bundle(plain)
        wanted = set(padded_graphs(b.path))
        unpadded = {e.name: e for e in [*pb.stages, *pb.prefixes[-1:]] if e.name in wanted}
        for g, e in unpadded.items():
            sess[f"{g} unpadded"] = ort.InferenceSession(str(pb.file(e, "onnx")), so, providers=["CPUExecutionProvider"])
    refs = {r: reference_onnx(work, r) for r in REFERENCES}
    ref_sess = {r: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for r, (p, _) in refs.items()}
    macs = {e.name: e.macs for e in graphs} | {r: mac for r, (_, mac) in refs.items()} | \
        {f"{g} unpadded": e.macs for g, e in unpadded.items()}
    for batch in batches:
        x = _inputs(m, batch, seed=2)
        carried: dict[str, np.ndarray] = {"input": x}
        feeds: dict[str, dict[str, np.ndarray]] = {}
        for e in graphs:  # each stage's own inputs: the tensors its predecessors carry
            feeds[e.name] = {i.tensor: carried[i.tensor] for i in e.inputs}
            if e in b.stages:
                carried.update(zip([o.tensor for o in e.outputs], sess[e.name].run(None, feeds[e.name])))
        for g in unpadded:
            feeds[f"{g} unpadded"] = feeds[g]
        xr = np.random.default_rng(3).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        calls = {g: (lambda s=s, f=feeds[g]: s.run(None, f)) for g, s in sess.items()}
        for r, rs in ref_sess.items():
            calls[r] = lambda rs=rs: rs.run(None, {"input": xr})
        for fn in calls.values():  # warm-up: first runs allocate
            fn()
        per = {g: max(1, int(round_s / max(_timeit(fn, 1), 1e-5))) for g, fn in calls.items()}
        times: dict[str, list[float]] = {g: [] for g in calls}
        for _ in range(rounds):  # rounds interleave the graphs: all see the same machine
            for g, fn in calls.items():
                times[g].append(_timeit(fn, per[g]) * 1e3)
        res = {}
        for g, v in times.items():
            ms = float(np.median(v))
            res[g] = {"ms": ms, "macs": int(macs[g]), "gflops": 2 * macs[g] * batch / (ms * 1e6)}
        out["graphs"][str(batch)] = res
        # where the time of the largest graph goes
        big = max(graphs, key=lambda e: e.macs)
        out.setdefault("ops", {})[str(batch)] = {"graph": big.name, "share": op_breakdown(
            b.file(big, "onnx"), feeds[big.name], threads, max(1, min(per[big.name], 20)))}
    return out


def _child(mode: str, name: str, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--models", name, "--work", str(args.work), *extra]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: the child's progress, shown
    if res.returncode != 0:
        raise SystemExit(f"{mode} of {name} failed (exit {res.returncode}): {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the parent


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    record = work / f"{name}.export.json"
    path = bundle_path(work, name)
    if args.reexport or not path.is_dir() or not record.is_file():
        if path.exists():
            shutil.rmtree(path)
        print(f"exporting {name} ({MODELS[name].about}) in a child process ...", file=sys.stderr, flush=True)
        exp = _child("export", name, args)
        from kdedge.io import atomic_write_text, dumps_strict

        atomic_write_text(record, dumps_strict(exp))
        exp["cached"] = False
    else:
        exp = json.loads(record.read_text())
        exp["cached"] = True
    out: dict[str, Any] = {"model": name, "about": MODELS[name].about, "export": exp}
    plain = bundle_path(work, name, padded=False)
    if plain.exists() and (args.reexport or not args.unpadded):  # stale, or compared only when asked
        shutil.rmtree(plain)
    if args.unpadded and padded_graphs(path) and not plain.is_dir():
        print(f"exporting {name} again without padded channels ...", file=sys.stderr, flush=True)
        _child("export-unpadded", name, args)
    opens = [_child("open", name, args) for _ in range(1 if args.quick else 3)]
    out["open"] = {k: float(np.median([o[k] for o in opens])) for k in opens[0]}
    out["timing"] = {}
    for t in args.settings:
        print(f"timing {name} at {t} thread(s) ...", file=sys.stderr, flush=True)
        out["timing"][str(t)] = _child("time", name, args, "--threads", str(t), "--batches",
                                       ",".join(map(str, args.batches)), *(["--quick"] if args.quick else []))
    return out


def _macs_of(work: Path, name: str) -> list[tuple[str, int]]:
    from kdedge.targets import open_bundle

    b = open_bundle(bundle_path(work, name))
    return [(e.name, e.macs) for e in [*b.stages, *b.prefixes]]


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from kdedge.device import cpu_model

    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs; "
          f"{'--quick, ' if args.quick else ''}medians\n")
    print("| model | stage MMACs (fused full) | export s | export peak MB | import s | open → first answer s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        macs = _macs_of(args.work, r["model"])
        st = " / ".join(f"{m / 1e6:.1f}" for n, m in macs if n.startswith("stage"))
        pre = [m for n, m in macs if n.startswith("prefix")]
        e, o = r["export"], r["open"]
        print(f"| {r['model']} | {st}{f' ({pre[-1] / 1e6:.1f})' if pre else ''} | {e['export_s']:.0f}"
              f"{' (cached)' if e['cached'] else ''} | {e['peak_rss_mb']:.0f} | {o['import_s']:.2f} | "
              f"{o['open_to_answer_s']:.2f} |")
    print("\nThrough the runner, interleaved blocks (ms per request):\n")
    print("| model | threads | batch | chain | fused | chain / fused |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for t, tm in r["timing"].items():
            for batch, v in tm["runner"].items():
                f = v.get("fused")
                fused = "" if f is None else f"{f:.2f} | {v['chain'] / f:.2f}"
                print(f"| {r['model']} | {t} | {batch} | {v['chain']:.2f} | {fused or ' | '} |")
    print("\nEach graph alone, plain onnxruntime session with the runner's options (GFLOP/s = 2·MACs·batch / time; "
          "% of resnet18 at the same threads and batch):\n")
    print("| model | threads | batch | graph | MMACs | ms | GFLOP/s | % of resnet18 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for t, tm in r["timing"].items():
            for batch, graphs in tm["graphs"].items():
                ref = graphs["resnet18"]["gflops"]
                for g, v in graphs.items():
                    print(f"| {r['model']} | {t} | {batch} | {g} | {v['macs'] / 1e6:.1f} | {v['ms']:.2f} | "
                          f"{v['gflops']:.1f} | {100 * v['gflops'] / ref:.0f} % |")
                mine = {g: v for g, v in graphs.items() if not g.endswith(" unpadded")}
                s_sum = sum(v["ms"] for g, v in mine.items() if g.startswith("stage"))
                full = [v["ms"] for g, v in mine.items() if g.startswith("prefix")]
                if full:
                    print(f"| {r['model']} | {t} | {batch} | *sum of stages / fused* | | {s_sum:.2f} / {full[0]:.2f} | "
                          f"| {s_sum / full[0]:.2f} |")
    print("\nWhere the largest graph's kernel time goes (onnxruntime profiler, share of the summed kernel times; "
          "kinds above 2 %):\n")
    print("| model | threads | batch | graph | share |")
    print("|---|---|---|---|---|")
    for r in results:
        for t, tm in r["timing"].items():
            for batch, ops in tm.get("ops", {}).items():
                parts = "; ".join(f"{k} {100 * v:.0f} %" for k, v in ops["share"].items() if v >= 0.02)
                print(f"| {r['model']} | {t} | {batch} | {ops['graph']} | {parts} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="bundles are kept and reused here")
    ap.add_argument("--threads", default="1,2,2s", help="thread settings; Ns: N threads in one onnxruntime pool "
                    "shared by every session (Runner(shared_pool=True))")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--quick", action="store_true", help="fewer and shorter repetitions (a smoke run)")
    ap.add_argument("--reexport", action="store_true", help="export again even where a bundle is kept")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--unpadded", action="store_true", help="also export the models whose graphs export padded "
                    "with zero channels without it (pad_channels=0) and time those graphs beside the padded ones")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement here
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    bad = [n for n in names if n not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    try:
        args.settings = [t.strip() for t in str(args.threads).split(",") if t.strip()]
        args.threads = [int(t.rstrip("s")) for t in args.settings]
        args.batches = [int(t) for t in str(args.batches).split(",")]
    except ValueError:
        ap.error("--threads takes comma-separated counts (2s: shared pool), --batches integers, e.g. 1,2,2s")
    if any(t < 1 for t in args.threads + args.batches):
        ap.error("--threads and --batches must be positive")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        name = names[0]
        if args.child == "export":
            res = child_export(name, args.work)
        elif args.child == "export-unpadded":
            res = child_export(name, args.work, padded=False)
        elif args.child == "open":
            res = child_open(name, args.work)
        else:
            global _SHARED
            _SHARED = args.settings[0].endswith("s")
            res = child_time(name, args.work, args.threads[0], args.batches, args.quick, _SHARED)
        print(json.dumps(res))
        return
    t0 = time.perf_counter()
    results = [bench_model(n, args) for n in names]
    print_tables(results, args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        from kdedge.device import cpu_model
        from kdedge.io import atomic_write_text, dumps_strict

        atomic_write_text(args.json, dumps_strict({"machine": platform.platform(), "cpu": cpu_model(),
                                                   "cpus": os.cpu_count(),
                                                   "quick": args.quick, "results": results}))


if __name__ == "__main__":
    main()
