"""The runner's chain with carried tensors in onnxruntime's blocked layout (``KDEDGE_ORT_BLOCKED=1``,
kdedge/targets/ort_blocked.py) against the same runner without it, and the fused full graph, at
batch 1 (results in docs/performance.md). Not a test: it times things.

Four paths (chain blocked, chain as the bundle's graphs, the fused graph through each runner),
in blocks of ``--per-block`` requests, in a new random order each round (seeded), so that no path
always follows the same one. Answers of the two chains are checked identical first.

    .venv/bin/python bench/bench_blocked_carry.py              # the CIFAR HNE of bench_paper_size.py
    .venv/bin/python bench/bench_blocked_carry.py --bundle B --rounds 60 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from kdedge.device import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_paper_size import DEFAULT_WORK, bundle_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: cifar-hne of bench_paper_size.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--per-block", type=int, default=20)
    args = ap.parse_args()
    path = args.bundle or bundle_path(DEFAULT_WORK, "cifar-hne")
    if not path.is_dir():
        raise SystemExit(f"no bundle at {path}: run bench/bench_paper_size.py --models cifar-hne first, or pass --bundle")

    from kdedge.runtime import Fixed, Full, Runner

    os.environ["KDEDGE_ORT_BLOCKED"] = "1"
    blk = Runner(path, threads=args.threads)
    os.environ.pop("KDEDGE_ORT_BLOCKED")
    plain = Runner(path, threads=args.threads)
    if not any(s.blocked for s in blk.sessions):
        raise SystemExit(f"{path.name}: no carried tensor can travel blocked on this CPU")
    x = np.random.default_rng(0).standard_normal((1, *plain.input_shape)).astype(np.float32)
    if not np.array_equal(blk.run(x, Full()).probs, plain.run(x, Full()).probs):
        raise SystemExit("the blocked chain answers differently")
    S = plain.num_stages
    paths = {"chain, carried tensors blocked": (blk, Full()), "chain, the bundle's graphs": (plain, Full()),
             "fused (default runner)": (plain, Fixed(S, fused=True)), "fused (blocked runner)": (blk, Fixed(S, fused=True))}
    ms: dict[str, list[float]] = {k: [] for k in paths}
    order = random.Random(0)
    for _ in range(args.rounds):
        for k in order.sample(list(paths), len(paths)):
            r, p = paths[k]
            r.run(x, p)
            for _ in range(args.per_block):
                t0 = time.perf_counter()
                r.run(x, p)
                ms[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: float(np.median(v)) for k, v in ms.items()}
    fused = (med["fused (default runner)"] + med["fused (blocked runner)"]) / 2
    print(f"\n{path.name}, {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; threads {args.threads}, "
          f"batch 1; {args.rounds} rounds x {args.per_block} requests per path; blocked: "
          f"{sorted({t for s in blk.sessions for t in s.blocked})}\n")
    print("| path | ms per request (median) | / fused |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / fused:.3f} |")


if __name__ == "__main__":
    main()
