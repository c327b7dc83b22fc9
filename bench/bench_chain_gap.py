"""Where a chain of stages loses time against the fused full graph, at batch 1 (results in
docs/performance.md). Not a test: it times things.

On one bundle with a fused full graph (default: the paper-size CIFAR HNE that
``bench/bench_paper_size.py`` exports), in one process, the paths in interleaved rounds of one
block each, in a new random order each round (seeded): a block runs slower after some paths than
after others, and a fixed or rotated order would give each path the same predecessor every round:

- the runner's chain (``Full()``) and its fused graph (``Fixed(S, fused=True)``): the whole
  request, the time spent inside onnxruntime's calls (the bound run wrapped with a timer), and
  the rest (the runner's own Python: policy, checks, combining);
- each stage graph inside the chain (the runner's ``stage_ms``) against the same graph run
  alone, over and over with its own inputs (its weights and activations stay in the caches);
- numpy's first call right after a session run against its second;
- the runner's chain with its carried tensors in onnxruntime's blocked layout
  (``KDEDGE_ORT_BLOCKED=1``, :mod:`kdedge.targets.ort_blocked`);
- the chain through a runner with ``bind=False`` (numpy feeds instead of bound buffers), and
  through plain sessions (numpy feeds), each session with its own memory arena (as the
  runner's) against one arena shared by all of them (onnxruntime's ``session.use_env_allocators``);
- the operators onnxruntime runs after optimising each graph, the stages' against the fused graph's;
- the chain through plain sessions whose carried tensors stay in onnxruntime's blocked (NCHWc)
  layout: each stage graph optimised by onnxruntime, then the ReorderOutput that ends a carried
  output and the ReorderInput that starts its consumers removed (:func:`blocked_graphs`; the
  answers are checked to be identical). What the layout conversions at the boundaries cost.

    .venv/bin/python bench/bench_chain_gap.py                      # the CIFAR HNE of bench_paper_size
    .venv/bin/python bench/bench_chain_gap.py --bundle B --threads 1 --rounds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdedge.device import cpu_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_paper_size import DEFAULT_WORK, bundle_path  # noqa: E402


def optimised(bundle: Any, entries: list[Any], threads: int) -> list[Any]:
    """The graphs of ``entries`` as onnxruntime optimises them here (ONNX models)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from kdedge.targets.ort_session import OrtOptions

    graphs = []
    with tempfile.TemporaryDirectory() as tmp:
        for e in entries:
            so = OrtOptions(threads=threads).session_options()
            so.optimized_model_filepath = str(Path(tmp) / f"{e.name}.onnx")
            ort.InferenceSession(str(bundle.file(e, "onnx")), so, providers=["CPUExecutionProvider"])
            graphs.append(onnx.load(so.optimized_model_filepath))
    return graphs


def blocked_graphs(bundle: Any, threads: int) -> list[bytes]:
    """The bundle's stage graphs as onnxruntime optimises them here, with the carried tensors
    left in the blocked layout by the runtime's own edit (:func:`kdedge.targets.ort_blocked.block_carried`;
    the graphs it does not change as onnxruntime saved them)."""
    from kdedge.targets.onnxruntime import carried_tensors
    from kdedge.targets.ort_blocked import block_carried

    models = [g.SerializeToString() for g in optimised(bundle, list(bundle.stages), threads)]
    edited, _ = block_carried(models, carried_tensors(bundle.stages))
    return [edited.get(k, m) for k, m in enumerate(models)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: cifar-hne of bench_paper_size.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=30, help="requests per path per round")
    args = ap.parse_args()
    path = args.bundle or bundle_path(DEFAULT_WORK, "cifar-hne")
    if not path.is_dir():
        raise SystemExit(f"no bundle at {path}: run bench/bench_paper_size.py --models cifar-hne first, or pass "
                         "--bundle")

    import onnxruntime as ort

    from kdedge.runtime import Fixed, Full, Runner
    from kdedge.targets import ort_session
    from kdedge.targets.ort_session import OrtOptions

    inside = [0.0]
    bound_call = ort_session._OrtBound.__call__

    def timed(self: Any, abort: Any = None) -> None:
        t = time.perf_counter()
        try:
            bound_call(self, abort)
        finally:
            inside[0] += time.perf_counter() - t

    ort_session._OrtBound.__call__ = timed  # type: ignore[method-assign]
    r = Runner(path, threads=args.threads)
    unbound = Runner(path, threads=args.threads, bind=False)
    if r.num_prefixes != r.num_stages:
        raise SystemExit(f"{path} has no fused full graph")
    x = np.random.default_rng(0).standard_normal((1, *r.input_shape)).astype(np.float32)
    r.warmup((1,))
    unbound.warmup((1,))
    S = r.num_stages
    policies = {"chain": Full(), "fused": Fixed(S, fused=True)}

    so = OrtOptions(threads=args.threads).session_options()
    alone = [ort.InferenceSession(str(r.bundle.file(e, "onnx")), so, providers=["CPUExecutionProvider"])
             for e in r.bundle.stages]
    ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                                        ort.OrtMemType.DEFAULT), ort.OrtArenaCfg(0, -1, -1, -1))
    so_env = OrtOptions(threads=args.threads, config=(("session.use_env_allocators", "1"),)).session_options()
    shared = [ort.InferenceSession(str(r.bundle.file(e, "onnx")), so_env, providers=["CPUExecutionProvider"])
              for e in r.bundle.stages]

    so_pre = OrtOptions(threads=args.threads, optimization="disable").session_options()
    blocked_bytes = blocked_graphs(r.bundle, args.threads)
    blocked = [ort.InferenceSession(g, so_pre, providers=["CPUExecutionProvider"]) for g in blocked_bytes]
    # the runner with its carried tensors in the blocked layout (opt-in; kdedge/targets/ort_blocked.py)
    os.environ["KDEDGE_ORT_BLOCKED"] = "1"
    r_blk = Runner(path, threads=args.threads)
    del os.environ["KDEDGE_ORT_BLOCKED"]
    if any(s.blocked for s in r.sessions) or not any(s.blocked for s in r_blk.sessions):
        raise SystemExit("expected the KDEDGE_ORT_BLOCKED=1 runner's chain blocked, and the default one not")
    r_blk.warmup((1,))

    def plain_chain(sessions: list[Any]) -> list[np.ndarray]:
        c: dict[str, np.ndarray] = {"input": x}
        logits = []
        for e, s in zip(r.bundle.stages, sessions):
            c.update(zip([o.tensor for o in e.outputs], s.run(None, {i.tensor: c[i.tensor] for i in e.inputs})))
            logits.append(c[e.logits_tensor])
        return logits

    if not all(np.array_equal(a, b) for a, b in zip(plain_chain(alone), plain_chain(blocked))):
        raise SystemExit("the chain with blocked carried tensors answers differently")
    if not np.array_equal(r.run(x, Full()).probs, r_blk.run(x, Full()).probs):
        raise SystemExit("the runner with blocked carried tensors answers differently")
    plain = {"the runner, bind=False (numpy feeds)": lambda: unbound.run(x, Full()),
             "the runner, carried tensors blocked (KDEDGE_ORT_BLOCKED=1)": lambda: r_blk.run(x, Full()),
             "plain sessions, an arena each": lambda: plain_chain(alone),
             "plain sessions, one shared arena": lambda: plain_chain(shared),
             "plain sessions, carried tensors blocked (NCHWc)": lambda: plain_chain(blocked)}
    plain_ms: dict[str, list[float]] = {k: [] for k in plain}
    carried: dict[str, np.ndarray] = {"input": x}
    feeds = []
    for e, s in zip(r.bundle.stages, alone):
        feeds.append({i.tensor: carried[i.tensor] for i in e.inputs})
        carried.update(zip([o.tensor for o in e.outputs], s.run(None, feeds[-1])))

    rows: dict[str, dict[str, list[float]]] = {k: {"total": [], "ort": []} for k in policies}
    in_chain: list[list[float]] = []
    by_itself: list[list[float]] = [[] for _ in range(S)]
    def runner_block(name: str) -> None:
        pol = policies[name]
        r.run(x, pol)
        for _ in range(args.per_round):
            inside[0] = 0.0
            t0 = time.perf_counter()
            res = r.run(x, pol)
            rows[name]["total"].append((time.perf_counter() - t0) * 1e3)
            rows[name]["ort"].append(inside[0] * 1e3)
            if name == "chain":
                in_chain.append(list(res.stage_ms))

    def plain_block(name: str) -> None:
        fn = plain[name]
        fn()
        for _ in range(args.per_round):
            t0 = time.perf_counter()
            fn()
            plain_ms[name].append((time.perf_counter() - t0) * 1e3)

    def alone_block(k: int) -> None:
        s, f = alone[k], feeds[k]
        s.run(None, f)
        for _ in range(args.per_round):
            t0 = time.perf_counter()
            s.run(None, f)
            by_itself[k].append((time.perf_counter() - t0) * 1e3)

    blocks = [lambda n=n: runner_block(n) for n in policies] + [lambda n=n: plain_block(n) for n in plain] + \
        [lambda k=k: alone_block(k) for k in range(S)]
    import random

    order = random.Random(0)
    for _ in range(args.rounds):  # a new order each round: a block runs slower right after certain others, and
        for block in order.sample(blocks, len(blocks)):  # a rotated fixed order would give each the same one
            block()
    # numpy right after a session run: its first call against its second (both checks of [1, K] logits)
    lg = np.zeros((1, len(r.classes)), np.float32)
    first: list[float] = []
    second: list[float] = []
    for _ in range(args.rounds * 10):
        alone[-1].run(None, feeds[-1])
        t0 = time.perf_counter()
        np.isfinite(lg).all()
        t1 = time.perf_counter()
        np.isfinite(lg).all()
        t2 = time.perf_counter()
        first.append((t1 - t0) * 1e6)
        second.append((t2 - t1) * 1e6)
    r.close()
    unbound.close()
    r_blk.close()

    med = lambda v: float(np.median(v))  # noqa: E731
    cpu = cpu_model()
    print(f"\n{path.name}, {cpu}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; threads {args.threads}, "
          f"batch 1; {args.rounds} rounds x {args.per_round} requests per path; medians (ms)\n")
    print("| path | request | inside onnxruntime | the runner's own |\n|---|---|---|---|")
    for name, v in rows.items():
        t, o = np.asarray(v["total"]), np.asarray(v["ort"])
        print(f"| {name} | {med(t):.3f} | {med(o):.3f} | {med(t - o):.3f} |")
    for name, v in plain_ms.items():
        print(f"| chain: {name} | {med(v):.3f} | | |")
    ratio = med(rows["chain"]["total"]) / med(rows["fused"]["total"])
    ratio_b = med(plain_ms["the runner, carried tensors blocked (KDEDGE_ORT_BLOCKED=1)"]) / med(rows["fused"]["total"])
    print(f"\nchain / fused: {ratio:.3f}; with the carried tensors blocked: {ratio_b:.3f}\n")
    print("| stage | in the chain | alone, repeated | ratio |\n|---|---|---|---|")
    chain_ms = np.median(np.asarray(in_chain), axis=0)
    for k in range(S):
        a = med(by_itself[k])
        print(f"| stage{k} | {chain_ms[k]:.3f} | {a:.3f} | {chain_ms[k] / a:.2f} |")
    sa = sum(med(v) for v in by_itself)
    print(f"| sum | {chain_ms.sum():.3f} | {sa:.3f} | {chain_ms.sum() / sa:.2f} |")
    print(f"\nnumpy right after a stage's session run: its first call (isfinite(...).all() of [1, K] logits) "
          f"{med(first):.1f} µs, the next one {med(second):.1f} µs")
    # what onnxruntime runs: the chain repeats, stage by stage, the depths the fused graph runs once
    # as grouped convolutions for all members
    import collections

    counts = [collections.Counter(n.op_type for n in g.graph.node)
              for g in optimised(r.bundle, [*r.bundle.stages, r.bundle.prefixes[-1]], args.threads)]
    ops = sorted(set().union(*counts), key=lambda op: -sum(c[op] for c in counts))
    print("\n| operators after onnxruntime's optimisation | " + " | ".join(ops) + " |\n|---|" + "---|" * len(ops))
    names = [e.name for e in r.bundle.stages] + [f"fused ({r.bundle.prefixes[-1].name})"]
    for name, c in zip(names, counts):
        print(f"| {name} | " + " | ".join(str(c[op]) for op in ops) + " |")
    print("| chain, all stages | " + " | ".join(str(sum(c[op] for c in counts[:-1])) for op in ops) + " |")


if __name__ == "__main__":
    main()
