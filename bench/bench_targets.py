"""Targets benchmark: CoreML conversion time, package size and op coverage per model family
(the tiny family configurations of the export tests, 8x8 inputs); torch-target stage latency on
CPU, and on CUDA with and without CUDA graphs when torch sees a GPU.

    .venv/bin/python bench/bench_targets.py --out docs/results/targets.json
    .venv/bin/python bench/bench_targets.py --families ahbf --parts coreml --out /tmp/targets.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdedge.bundle.files import path_bytes
from kdedge.export.graphs import graph_example_inputs, plan_model
from kdedge.models import create_model
from kdedge.targets import CompileSpec, get_target
from kdedge.export.graphs import graph_sources

FAMILIES = {
    "hne": dict(config="tiny", B=2),
    "ahbf": dict(backbone="resnet8", width=4, branches=3, aux=1),
    "multiexit": dict(backbone="resnet20", backbone_args={"width": 4}),
}


def _plan(family: str) -> Any:
    torch.manual_seed(0)
    net = create_model(family, num_classes=10, in_channels=1, input_size=(8, 8), **FAMILIES[family]).eval()
    return plan_model(net)


def coreml_row(family: str, work: Path) -> dict[str, Any]:
    plan = _plan(family)
    sources = graph_sources(plan, graph_example_inputs(plan, torch.zeros(2, 1, 8, 8)), work)
    t = get_target("coreml")
    t0 = time.perf_counter()
    files = t.compile(sources, CompileSpec(precision="fp16", device="all"), work / family)
    dt = time.perf_counter() - t0
    pkg = work / family / "model.mlpackage"
    from kdedge.targets.coreml import package_functions

    # every graph's entry names the one package and its own function (no per-graph files)
    functions = sorted(f.extra["function"] for f in files.values())
    if {f.path for f in files.values()} != {pkg} or functions != sorted(files):
        raise RuntimeError(f"{family}: the coreml files are not the functions of one package: {files}")
    funcs = package_functions(pkg)
    ops = sorted({o for f in funcs.values() for o in f.get("ops", [])})
    onnx_free = sum(p.numel() * 2 for g in plan.graphs for p in g.module.parameters())  # fp16 bytes, shared counted per graph
    return {"family": family, "graphs": len(files), "convert_s": round(dt, 2), "package_bytes": path_bytes(pkg),
            "fp16_param_bytes_if_not_shared": onnx_free, "ops": ops}


def torch_latency(family: str, work: Path, device: str, cuda_graphs: bool, runs: int = 200) -> dict[str, Any]:
    plan = _plan(family)
    x = torch.randn(1, 1, 8, 8)
    sources = graph_sources(plan, graph_example_inputs(plan, torch.cat([x, x])), work)
    t = get_target("torch")
    d = work / f"torch-{family}"
    files = t.compile(sources[: len(plan.stages)], CompileSpec(device=device), d)
    sessions = [t.open(files[g.name].path, name=g.name, inputs=g.inputs, outputs=g.outputs, device=device,
                       cuda_graphs=cuda_graphs, host_outputs=(g.logits_tensor,)) for g in plan.stages]
    feeds: dict[str, Any] = {"input": x.numpy()}
    per = np.zeros((runs, len(sessions)))
    for r in range(runs + 20):
        feeds = {"input": x.numpy()}
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            feeds.update(s.run({n: feeds[n] for n in s.inputs}))
            if device == "cuda":
                torch.cuda.synchronize()
            if r >= 20:
                per[r - 20, k] = (time.perf_counter() - t0) * 1e3
    return {"family": family, "device": device, "cuda_graphs": cuda_graphs,
            "stage_ms_median": [round(float(v), 4) for v in np.median(per, 0)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/results/targets.json")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--parts", default="coreml,torch", help="comma-separated: coreml (conversion), torch (latency)")
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    parts = {p for p in args.parts.split(",") if p}
    if not families or set(families) - set(FAMILIES) or not parts or parts - {"coreml", "torch"}:
        ap.error(f"--families takes {', '.join(FAMILIES)}; --parts takes coreml, torch")
    res: dict[str, Any] = {"torch": torch.__version__, "coreml": [], "torch_latency": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fam in families if "coreml" in parts else []:
            try:
                row = coreml_row(fam, work)
            except ValueError as e:  # a stage CoreML cannot convert: recorded, not hidden
                row = {"family": fam, "error": str(e)}
            print(json.dumps(row))
            res["coreml"].append(row)
        for fam in families if "torch" in parts else []:
            modes = [("cpu", False)] + ([("cuda", False), ("cuda", True)] if torch.cuda.is_available() else [])
            for dev, cg in modes:
                row = torch_latency(fam, work, dev, cg)
                print(json.dumps(row))
                res["torch_latency"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
