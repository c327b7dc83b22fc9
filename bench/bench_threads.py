"""Thread settings of the runner's onnxruntime sessions, one process per setting (results in
docs/runtime.md, "Threads"). Not a test: it times things.

For each bundle and setting, in a fresh process: after warm-up, N batch-1 requests of the whole
stage chain (``Full()``) and N of the fused full graph (``Fixed(S)``), then p50 / p99 / max and
the share over 5 ms; and the runner's own time outside the stages (request time minus the sum
of its stage times) for one-stage and full requests. Settings:

- ``1``: one intra-op thread per session (the default);
- ``2``: two threads per session, each session with its own pool (onnxruntime's spinning on);
- ``2-nospin``: the same with ``session.intra_op.allow_spinning`` 0;
- ``2-global``: one process-wide onnxruntime pool of two threads shared by every session
  (``set_global_thread_pool_sizes`` + ``use_per_session_threads = False``), which onnxruntime
  allows only for all sessions of a process at once.

    .venv/bin/python bench/bench_threads.py --bundle /tmp/kdedge-bench-contention/demo-hne.kdedge --requests 4000
    .venv/bin/python bench/bench_threads.py --bundle /tmp/kdedge-bench-contention/cifar-hne.kdedge --requests 400

(``bench/bench_contention.py`` writes both bundles.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

SETTINGS = ("1", "2", "2-nospin", "2-global")


def measure(bundle: str, setting: str, requests: int) -> dict[str, Any]:
    """In this process: the numbers of one setting."""
    import numpy as np

    from kdedge.runtime import Fixed, Full, Runner
    from kdedge.targets.ort_session import OrtOptions

    threads = int(setting[0])
    opts = OrtOptions(threads=threads, spinning=setting != "2-nospin")
    if setting == "2-global":
        import onnxruntime as ort

        ort.set_global_thread_pool_sizes(threads, 1)
        ort.set_default_logger_severity(3)
        base = OrtOptions.session_options

        def shared(self: OrtOptions) -> Any:
            so = base(self)
            so.use_per_session_threads = False
            return so

        OrtOptions.session_options = shared  # type: ignore[method-assign]
    out: dict[str, Any] = {"setting": setting}
    with Runner(bundle, session_options=opts) as r:
        x = np.zeros((1, *r.input_shape), np.float32)
        r.warmup()
        for name, pol in (("chain", Full()), ("fused", Fixed(r.num_stages, fused=True)),
                          ("stage0", Fixed(1, fused=False))):
            t, outside = [], []
            for _ in range(requests):
                res = r.run(x, pol)
                t.append(float(res.total_ms[0]))
                outside.append(float(res.total_ms[0]) - sum(res.stage_ms))
            a, o = np.array(t), np.array(outside)
            out[name] = {"p50": float(np.median(a)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
                         "over_5ms": float((a > 5).mean()),
                         "outside_stages_p50": float(np.median(o)), "outside_stages_p99": float(np.percentile(o, 99))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one setting here
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.bundle, args.one, args.requests)))
        return
    print(f"{args.bundle}: {args.requests} batch-1 requests per graph and setting, one process per setting")
    print("| setting | chain p50 / p99 / max ms | chain > 5 ms | fused p50 / p99 ms | runner outside stages, "
          "1 stage / chain, p50 / p99 µs |")
    print("|---|---|---|---|---|")
    for setting in args.settings.split(","):
        res = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--requests", str(args.requests),
                              "--one", setting], capture_output=True, text=True, check=True)
        m = json.loads(res.stdout.strip().splitlines()[-1])
        c, f, s0 = m["chain"], m["fused"], m["stage0"]
        print(f"| {setting} | {c['p50']:.3f} / {c['p99']:.3f} / {c['max']:.2f} | {100 * c['over_5ms']:.2f} % | "
              f"{f['p50']:.3f} / {f['p99']:.3f} | {1e3 * s0['outside_stages_p50']:.0f} / "
              f"{1e3 * s0['outside_stages_p99']:.0f}, {1e3 * c['outside_stages_p50']:.0f} / "
              f"{1e3 * c['outside_stages_p99']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
