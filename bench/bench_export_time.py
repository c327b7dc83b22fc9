"""Where the export time of a paper-size model goes, and what the exporter choices cost (results in
docs/performance.md, "Export and opening a bundle"). Not a test: it times things.

On the CIFAR HNE (``hne``, ``config: resnet``, ``B: 4``, random weights, 64 synthetic images):

1. one whole ``kdedge.export.export``, its time split by the progress steps it prints (torch tracing
   and MAC counting before the first graph, each graph's ONNX export, verification, writing);
2. the fused 16-member graph exported alone with and without BatchNorm folded (``kdedge/export/fold.py``),
   interleaved, ``--repeats`` times each;
3. that graph from the dynamo and the legacy (TorchScript) exporter: nodes, and onnxruntime's median
   batch-1 time at one thread (interleaved).

    .venv/bin/python bench/bench_export_time.py            # about 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50, help="onnxruntime calls per exporter")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    from kdedge.export import export
    from kdedge.export.fold import fold_batchnorm
    from kdedge.export.graphs import graph_example_inputs, plan_model
    from kdedge.export.onnx import export_graph
    from kdedge.models import create_model

    torch.manual_seed(0)
    model = create_model("hne", num_classes=100, in_channels=3, input_size=(32, 32), config="resnet", B=4).eval()
    info = {"name": "synthetic", "num_classes": 100, "in_channels": 3, "input_size": [32, 32], "mean": [0.5] * 3,
            "std": [0.25] * 3, "scale": 1 / 255, "channel_order": "RGB", "class_names": [str(i) for i in range(100)],
            "resize": None}
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="kdedge-export-time-"))

    # 1. one export, split by its progress steps
    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    export(model, work / "b.kdedge", info=info, val_data=(x, np.zeros(64, np.int64)),
           progress=lambda m: marks.append((time.perf_counter() - t0, m)))
    total = time.perf_counter() - t0
    marks.append((total, "done"))
    phases: dict[str, float] = {"before the first graph (torch tracing, MAC counting)": marks[0][0]}
    for (t, m), (t_next, _) in zip(marks, marks[1:]):
        key = "ONNX export of the graphs" if m.startswith("export ") else m
        phases[key] = phases.get(key, 0.0) + t_next - t
    print(f"\nCIFAR HNE export: {total:.1f} s\n\n| step | s | share |\n|---|---|---|")
    for k, v in phases.items():
        print(f"| {k} | {v:.1f} | {100 * v / total:.0f} % |")

    # 2. the fused graph with and without BatchNorm folded, interleaved
    plan = plan_model(model)
    g = plan.prefixes[-1]
    ex = graph_example_inputs(plan, torch.from_numpy(x[:2]))[g.name]
    folded, n = fold_batchnorm(g.module)
    times: dict[str, list[float]] = {"unfolded": [], "folded": []}
    for _ in range(args.repeats):
        for name, mod in (("unfolded", g.module), ("folded", folded)):
            t = time.perf_counter()
            export_graph(mod, ex, work / f"{name}.onnx", inputs=g.inputs, outputs=g.outputs, exporter="dynamo")
            times[name].append(time.perf_counter() - t)
    print(f"\n{g.name} ({n} BatchNorm folded), dynamo export s: "
          + "; ".join(f"{k} {', '.join(f'{v:.1f}' for v in vs)}" for k, vs in times.items()))

    # 3. dynamo vs legacy graphs of the same (folded) module
    export_graph(folded, ex, work / "legacy.onnx", inputs=g.inputs, outputs=g.outputs, exporter="legacy")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = {k: ort.InferenceSession(str(work / f"{f}.onnx"), so, providers=["CPUExecutionProvider"])
            for k, f in (("dynamo", "folded"), ("legacy", "legacy"))}
    x1 = {"input": x[:1]}
    ms: dict[str, list[float]] = {k: [] for k in sess}
    for s in sess.values():
        s.run(None, x1)
    for _ in range(args.runs):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, x1)
            ms[k].append((time.perf_counter() - t) * 1e3)
    print("\n| exporter | nodes | onnxruntime batch 1, 1 thread, median ms |\n|---|---|---|")
    for k, f in (("dynamo", "folded"), ("legacy", "legacy")):
        nodes = len(onnx.load(str(work / f"{f}.onnx")).graph.node)
        print(f"| {k} | {nodes} | {np.median(ms[k]):.2f} |")


if __name__ == "__main__":
    main()
