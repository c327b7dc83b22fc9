"""Two threads per request: could the small stages of a chain run on one thread while the large
ones use two? (results in docs/performance.md). Not a test: it times things.

At batch 1 the small first stages of the CIFAR HNE use a second thread badly. onnxruntime's
Python API has one intra-op pool per process once a shared pool is made
(``set_global_thread_pool_sizes``): every session of the process must then use it, so a
session cannot opt out to run on its caller's thread. What remains is a pool per session. This
compares, each against the fused full graph on two threads in the same process, interleaved
(rounds of one block per path, in a new random order each round, seeded):

- ``shared``: every stage in one shared pool of two threads (``Runner(threads=2, shared_pool=True)``);
- ``own``: a pool per session: every stage on one thread; stages below ``--small`` on one
  thread and the rest on two, with spinning on and off (``session.intra_op.allow_spinning``).

The two settings need two processes (one shared pool per process): the script runs itself
once per setting.

    .venv/bin/python bench/bench_stage_threads.py          # the cifar-hne of bench_paper_size.py
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdedge.device import cpu_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_paper_size import DEFAULT_WORK, bundle_path  # noqa: E402


def measure(bundle: Path, setting: str, small: int, rounds: int, per_round: int) -> dict[str, float]:
    """(one process) Median ms per request of each path of ``setting``, and of the fused graph."""
    import onnxruntime as ort

    from kdedge.runtime import open_bundle

    b = open_bundle(bundle)
    if len(b.prefixes) != len(b.stages):
        raise SystemExit(f"{bundle} has no fused full graph")
    shared = setting == "shared"
    if shared:
        ort.set_global_thread_pool_sizes(2, 1)

    def session(entry: Any, threads: int, spin: bool = True) -> Any:
        so = ort.SessionOptions()
        if shared:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            if not spin:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(bundle / entry.files["onnx"].path), so, providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).standard_normal((1, *b.input_shape[1:])).astype(np.float32)
    stages = b.stages

    def chain(sessions: list[Any]) -> Callable[[], None]:
        def run() -> None:
            feeds = {"input": x}
            for e, s in zip(stages, sessions):
                outs = s.run(None, {i.tensor: feeds[i.tensor] for i in e.inputs})
                feeds.update({o.tensor: v for o, v in zip(e.outputs, outs)})
        return run

    paths: dict[str, Callable[[], None]] = {}
    if shared:
        paths["chain, one shared pool of 2"] = chain([session(e, 2) for e in stages])
    else:
        paths["chain, 1 thread per stage"] = chain([session(e, 1) for e in stages])
        paths[f"chain, stages < {small} on 1, the rest on 2"] = chain(
            [session(e, 1 if k < small else 2) for k, e in enumerate(stages)])
        paths[f"chain, stages < {small} on 1, the rest on 2, no spinning"] = chain(
            [session(e, 1 if k < small else 2, spin=False) for k, e in enumerate(stages)])
    fused = session(b.prefixes[-1], 2)
    paths["fused, 2 threads"] = lambda: fused.run(None, {"input": x})
    for p in paths.values():  # warm-up
        for _ in range(20):
            p()
    times: dict[str, list[float]] = {n: [] for n in paths}
    names = list(paths)
    order = random.Random(0)
    for _ in range(rounds):  # a new order each round: no path always follows the same one
        for n in order.sample(names, len(names)):
            for i in range(per_round):
                t = time.perf_counter()
                paths[n]()
                if i >= 3:  # the first requests after a switch of path run slower
                    times[n].append((time.perf_counter() - t) * 1e3)
    return {n: float(np.median(v)) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: cifar-hne of bench_paper_size.py")
    ap.add_argument("--small", type=int, default=3, help="stages below this index are the small ones")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=30, help="requests per path per round")
    ap.add_argument("--child", choices=("shared", "own"), help=argparse.SUPPRESS)  # internal: one setting
    args = ap.parse_args()
    path = args.bundle or bundle_path(DEFAULT_WORK, "cifar-hne")
    if not path.is_dir():
        raise SystemExit(f"no bundle at {path}: run bench/bench_paper_size.py --models cifar-hne first, or pass "
                         "--bundle")
    if args.child:
        print(json.dumps(measure(path, args.child, args.small, args.rounds, args.per_round)))
        return
    print(f"{path.name}, {cpu_model()}; batch 1, medians (ms), each against the fused graph of its own process\n")
    print("| setting | path | ms | / fused |\n|---|---|---|---|")
    for setting in ("shared", "own"):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--bundle", str(path), "--small",
                              str(args.small), "--rounds", str(args.rounds), "--per-round", str(args.per_round)],
                             check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        fused = res["fused, 2 threads"]
        for name, ms in res.items():
            print(f"| {setting} | {name} | {ms:.3f} | {ms / fused:.3f} |")


if __name__ == "__main__":
    main()
