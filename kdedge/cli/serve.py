"""``kdedge serve``: answer classification requests over HTTP, each as deep as its deadline and the load allow."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from kdedge.cli.common import (CpuLatencyOpt, CpusOpt, MlockOpt, RealtimeOpt, RtPolicyOpt, RtPriorityOpt,
                               err, handle_errors, realtime_options)

HELP = """Serve a bundle over HTTP (needs the serve extra: pip install 'kdedge\\[serve]').
Requests queue and are batched (up to --max-batch samples per micro-batch); before every stage
each sample goes on only if the stage fits its deadline and leaves the queued requests enough
time. Under overload the answers get shallower before any deadline is missed; a request is
refused at once (503, status "shed") only when even stage 0 cannot be answered in time. With
--stages K every request runs exactly K stages instead (what a plain serving stack does).

The deadline planning needs a latency profile of this device measured at the batch sizes
served: kdedge profile BUNDLE --batch 1,8,32 --threads N.

Endpoints: POST /v1/classify (body: an image file or a .npy; deadline: X-Deadline-Ms header or
?deadline_ms=), GET /v1/health (200 once warmed up), GET /v1/model, GET /metrics (Prometheus).
It listens on 127.0.0.1 only unless --host says otherwise; it has no authentication or TLS:
to expose it, put it behind a reverse proxy (docs/serving.md). Ctrl-C (or SIGTERM) stops
accepting, answers every request already accepted, then exits.

Examples:

  kdedge serve hne.kdedge --deadline-ms 20

  curl --data-binary @digit.png -H 'X-Deadline-Ms: 10' http://127.0.0.1:8000/v1/classify

  kdedge serve hne.kdedge --deadline-ms 20 --max-batch 32 --port 9000

  kdedge serve hne.kdedge --stages 4 --deadline-ms 20        # fixed depth: the baseline

  kdedge serve hne.kdedge --deadline-ms 20 --realtime --cpus 1
"""


@handle_errors
def command(
    bundle: Path = typer.Argument(..., help="A bundle directory (from kdedge export)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default loopback only; 0.0.0.0: every "
                             "interface, see docs/serving.md before exposing it)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port; the address is printed)."),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="Deadline of a request that brings "
                                                "none (X-Deadline-Ms), from its arrival."),
    max_batch: int = typer.Option(32, "--max-batch", help="Samples per micro-batch, at most."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Requests waiting, at most (then 503 queue_full)."),
    stages: Optional[int] = typer.Option(None, help="Run exactly the first N stages for every request (a plain "
                                         "serving stack, through the fused prefix graph when the bundle has one)."),
    margin_ms: float = typer.Option(1.0, "--margin-ms", help="Time kept free before each deadline for the "
                                    "response and jitter. Deadlines count from the handler's start: where clients "
                                    "and the HTTP layer share the model's CPUs, raise it to cover their delay at "
                                    "the peak rate (docs/serving.md: 15-25 ms of 100 at 2x load on 2 cores)."),
    stat: str = typer.Option("p99", help="Profile statistic that predicts a stage (p99, p95, median, ...)."),
    online: int = typer.Option(32, help="Window (stages) of the online load factor that scales the profile when "
                               "stages run slower than profiled (0: off)."),
    target: str = typer.Option("onnx", help="Which of the bundle's targets to run (auto: the fastest that runs here)."),
    device: Optional[str] = typer.Option(None, help="Where the target's sessions run (cpu, cuda, ...)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per session (part of the profile's key)."),
    profile: Optional[Path] = typer.Option(None, help="A latency profile file instead of the bundle's own."),
    max_body: int = typer.Option(8 << 20, "--max-body", help="Largest request body in bytes (413 beyond)."),
    limit_concurrency: Optional[int] = typer.Option(None, "--limit-concurrency", help="Beyond this many classify "
                                                    "requests in progress, answer 503 'overloaded' at once, before "
                                                    "reading the body (when the HTTP layer itself cannot keep up)."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="At shutdown: seconds to answer what is "
                                        "in flight and queued; what remains then is refused."),
    realtime: RealtimeOpt = False,
    rt_priority: RtPriorityOpt = None,
    rt_policy: RtPolicyOpt = None,
    cpus: CpusOpt = None,
    mlock: MlockOpt = None,
    cpu_latency: CpuLatencyOpt = None,
    gc_freeze: bool = typer.Option(True, "--gc-freeze/--no-gc-freeze", help="After the warm-up, move every "
                                   "object alive then into Python's permanent gc generation, so that full "
                                   "collections while serving stay short (48-58 ms each otherwise on 2 cores: "
                                   "docs/serving.md). --no-gc-freeze leaves the gc alone, with --realtime too."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level (info shows each "
                                  "connection)."),
) -> None:
    import math

    try:
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        what = e.name or f"its serving packages ({(str(e) or 'not importable').splitlines()[0]})"
        raise ImportError(f"kdedge serve needs {what}: pip install 'kdedge[serve]'") from None
    from kdedge.serve import bind, build, create_app, run_server

    if not 1 <= max_body <= 1 << 30:
        raise ValueError(f"--max-body must be 1 … {1 << 30} bytes, got {max_body}")
    if not (math.isfinite(drain_timeout) and drain_timeout > 0):
        raise ValueError(f"--drain-timeout must be a positive number of seconds, got {drain_timeout}")
    if limit_concurrency is not None and not 1 <= limit_concurrency <= 1_000_000:
        raise ValueError(f"--limit-concurrency must be 1 … 1000000, got {limit_concurrency}")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise ValueError(f"--log-level must be critical, error, warning, info or debug, got {log_level!r}")
    rt = realtime_options(realtime, rt_priority, rt_policy, cpus, mlock, cpu_latency)
    if rt is not None and not gc_freeze:
        import dataclasses

        rt = dataclasses.replace(rt, freeze_gc=False)
    sock = bind(host, port)  # before the model loads: a port in use fails at once
    try:
        runner, sched = build(bundle, target=target, threads=threads, device=device, realtime=rt,
                              profile=str(profile) if profile is not None else "auto", deadline_ms=deadline_ms,
                              max_batch=max_batch, max_queue=max_queue, stages=stages, margin_ms=margin_ms,
                              stat=stat, online=online, freeze_gc=gc_freeze)
    except BaseException:
        sock.close()
        raise
    try:
        _announce(runner, sched, sock, host)
        app = create_app(runner, sched, max_body=max_body, drain_timeout=drain_timeout,
                         limit_concurrency=limit_concurrency,
                         log=lambda line: err.print(line, highlight=False, soft_wrap=True, markup=False))
        run_server(app, sock, log_level=log_level, graceful_s=drain_timeout)
    finally:
        sched.close(drain=False)
        runner.close()
        sock.close()
    s = sched.stats()
    err.print(f"stopped: {s['ok']} answered ({s['misses']} after their deadline), {s['shed']} shed, "
              f"{s['queue_full']} refused (queue full), {s['closed']} refused while closing, {s['error']} failed",
              highlight=False, soft_wrap=True)


def _announce(runner: Any, sched: Any, sock: Any, host: str) -> None:
    """The address and the plan, on stderr (stdout stays free); warnings that change what to do."""
    from rich.markup import escape

    from kdedge.serve import is_loopback

    addr, port = sock.getsockname()[:2]
    shown = f"[{addr}]" if ":" in addr else addr
    mode = "anytime" if sched.stages is None else f"fixed {sched.stages} of {sched.num_stages} stages"
    dl = f"deadline {sched.deadline_ms:g} ms" if sched.deadline_ms is not None else "no default deadline"
    err.print(f"kdedge serve: {escape(str(runner.bundle.path))} ({escape(runner.bundle.family)}, "
              f"{sched.num_stages} stages) on http://{shown}:{port} — {mode}, {dl}, batches up to {sched.max_batch}; "
              "ready once GET /v1/health answers 200", highlight=False, soft_wrap=True)
    if not sched.describe()["planned"]:
        why = f" ({sched.profile_note})" if sched.profile_note else ""
        err.print(f"note: no usable latency profile{why}: requests are admitted by the queue's bound only "
                  "(kdedge profile BUNDLE --batch 1,8,32 enables deadline admission)", highlight=False, soft_wrap=True,
                  markup=False)
    else:
        try:
            top = max(runner.profile.batches)
        except Exception:  # a profile given through costs, not the runner's
            top = sched.max_batch
        if top < sched.max_batch:
            err.print(f"note: the latency profile was measured up to batch {top}; larger micro-batches are planned "
                      f"by scaling it proportionally (conservative): kdedge profile {escape(str(runner.bundle.path))} "
                      f"--batch 1,8,{sched.max_batch} plans them as measured", highlight=False, soft_wrap=True)
    if not is_loopback(addr):
        err.print(f"note: listening on {shown}, reachable from other machines; the server has no authentication "
                  "or TLS: put it behind a reverse proxy (docs/serving.md)", highlight=False, soft_wrap=True)
