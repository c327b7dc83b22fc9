"""Serving under load: ``kdedge serve`` as an anytime server, as a fixed full-depth model (what a
plain serving stack does) and as a fixed shallow one, against an open-loop client (results in
docs/serving.md). Not a test: it times things.

1. The model: the demo HNE trained on mnist5k (``configs/hne_mnist_demo.yaml``; ``--width 4``
   makes it four times as wide, about 16x the compute, so that on a 2-core machine the model
   rather than the HTTP layer bounds what a server answers), or ``--bundle`` (e.g. the
   paper-size CIFAR HNE that bench/bench_contention.py makes).
   It is profiled at batch 1, 8 and ``--max-batch`` (``kdedge profile``), as a user would.
2. Each server runs as its own ``kdedge serve`` process on a loopback port; the client is
   another process: Poisson arrivals at a fixed rate for ``--duration`` seconds (open loop:
   a request is sent at its time whether or not earlier ones were answered), every request a
   PNG of the test split with the same deadline (``X-Deadline-Ms``), over keep-alive
   connections (a new one whenever all are busy).
3. Capacity: the fixed full-depth server, saturated by a closed-loop client (``2 x
   --max-batch`` requests always in flight, no deadline), answers C requests/s: the full
   model's capacity with the same batching. The rates are ``--rates`` x C.
4. Per server and rate: requests answered in time (by the client's clock: goodput), late
   (and late by the server's own clock, its ``total_ms``), shed (503 at once), other refusals,
   lost (no answer: never expected), accuracy of the answers, mean stage, p50/p99 end-to-end
   of the answers, p99 of the refusals. Where late answers' time went: the time outside the
   handler (end-to-end minus ``total_ms``), the client's own loop lag (a 1 ms ticker), the CPU
   both processes used, and the server's garbage collections (from its ``/metrics``). The
   client runs with its collector frozen and off (``--client-gc``): a full collection of its
   own records stalled it for tens of milliseconds, and what it read then looked late.
   ``--repeat``, ``--anytime-variants`` (extra server flags, e.g. ``'|--no-gc-freeze'``),
   ``--client-nice`` and ``--client-gc off,on`` alternate what they compare.
5. Server overhead (HTTP + queue): on the anytime server at a low rate, one request at a time:
   end-to-end at the client minus the server's ``compute_ms``.

    .venv/bin/python bench/bench_serve.py --bundle /tmp/kdedge-bench-contention/cifar-hne.kdedge --duration 8 \
        --deadline-ms 200 --max-batch 8 --margin-ms 5 --profile-runs 30 --images 300 --json /tmp/serve-cifar.json \
        --plot docs/serving-load.png
    .venv/bin/python bench/bench_serve.py --duration 4 --rates 0.5,2      # the demo HNE, quicker
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdedge.device import cpu_model

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("fixed-full", "anytime", "fixed-shallow")


# ---------------------------------------------------------------------------------------------
# the model and its data


def demo_bundle(work: Path, width: float, epochs: int) -> Path:
    """The demo HNE (``width`` x as wide, trained ``epochs`` epochs), trained and exported once
    into ``work``."""
    from kdedge.config import load_config
    from kdedge.export import export_run
    from kdedge.train.engine import fit

    run = work / "runs" / f"hne-w{width:g}-e{epochs}"  # a run of other epochs is another model
    status = run / "run.json"
    if not (status.is_file() and json.loads(status.read_text()).get("status") == "finished"):
        if run.exists():
            import shutil

            shutil.rmtree(run)
        overrides = ["train.device=cpu", f"train.epochs={epochs}", f"model.args.width={width}"]
        fit(load_config(str(ROOT / "configs" / "hne_mnist_demo.yaml"), overrides), run)
    path = work / f"hne-w{width:g}-e{epochs}.kdedge"
    if not path.is_dir():
        export_run(run, path, force=True)
    return path


def test_images(bundle: Path, limit: int) -> tuple[list[bytes], np.ndarray, str]:
    """PNG bodies of the bundle's dataset's test split, their labels, and what the labels are.

    A bundle of a dataset that is not here (the synthetic paper-size CIFAR HNE) gets random
    images of its input size, labelled with its own full-depth prediction: its "accuracy" is
    then the agreement of an answer with the full model's."""
    from PIL import Image

    from kdedge.runtime import Full, Runner, open_bundle, preprocess

    b = open_bundle(bundle)
    try:
        from kdedge.train.data import DataConfig, load_data

        ds = load_data(DataConfig(name=b.preprocessing["dataset"]), 0).test
        n = min(limit, len(ds))
        raws = [np.asarray(ds.raw(i), np.uint8) for i in range(n)]
        labels = np.asarray(ds.targets[:n], np.int64)
        what = f"{b.preprocessing['dataset']} test split"
    except Exception:  # no such dataset here: synthetic images, the full model's answers as labels
        _, c, h, w = b.input_shape
        rng = np.random.default_rng(0)
        raws = [rng.integers(0, 256, size=(h, w, c), dtype=np.uint8) for _ in range(limit)]
        with Runner(bundle, threads=1) as r:
            x = np.concatenate([preprocess(raw, b) for raw in raws])
            labels = np.concatenate([r.run(x[i: i + 32], Full()).labels for i in range(0, len(x), 32)])
        what = "random images, labelled with the full model's prediction (accuracy = agreement with it)"
    bodies = []
    for raw in raws:
        if raw.ndim == 3 and raw.shape[-1] == 1:  # grey HWC: PNG wants HW
            raw = raw[:, :, 0]
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    return bodies, labels, what


def profile(bundle: Path, max_batch: int, threads: int, runs: int, *flags: str) -> None:
    cmd = [sys.executable, "-m", "kdedge.cli.main", "profile", str(bundle), "--batch",
           ",".join(str(b) for b in sorted({1, 8, max_batch})), "--threads", str(threads), "--runs", str(runs),
           *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# a server process


class ServerProcess:
    """``kdedge serve`` in a subprocess on a free loopback port; stopped with SIGINT."""

    def __init__(self, bundle: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kdedge.cli.main", "serve", str(bundle), "--port", "0",
                                      *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env} if env else None)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(m.group(1))
        self.lines: list[str] = [line.strip()]
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self._wait_ready()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.strip())

    def _wait_ready(self, timeout: float = 120.0) -> None:
        import http.client

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/v1/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited: " + " | ".join(self.lines))
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (all its threads, user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return next((ln for ln in reversed(self.lines) if ln.startswith("stopped:")), "")


# ---------------------------------------------------------------------------------------------
# the client (its own process)


async def _send(conn: tuple[Any, Any], head: bytes, body: bytes) -> tuple[int, bytes, bool]:
    reader, writer = conn
    writer.write(head + body)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    code = int(status_line.split()[1])
    length, keep = 0, True
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"connection" and v.strip().lower() == b"close":
            keep = False
    return code, await reader.readexactly(length), keep


async def _load(port: int, bodies: list[bytes], rate: float | None, duration: float, deadline_ms: float,
                seed: int, inflight: int) -> dict[str, Any]:
    """Open loop at ``rate`` requests/s (Poisson), or closed loop with ``inflight`` requests
    always outstanding (``rate`` None)."""
    rng = np.random.default_rng(seed)
    if rate is not None:
        gaps = rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 16)
        times = np.cumsum(gaps)
        times = times[times < duration]
    else:
        times = np.zeros(0)
    n_max = len(times) if rate is not None else int(1e7)
    pick = rng.integers(len(bodies), size=max(len(times), 1_000_000 if rate is None else 1))
    heads = [(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
              f"X-Deadline-Ms: {deadline_ms:g}\r\nContent-Length: {len(b)}\r\n\r\n").encode() for b in bodies]
    pool: list[tuple[Any, Any]] = []
    rec: dict[str, list[Any]] = {k: [] for k in ("i", "t", "code", "e2e", "body", "send_lag")}
    lost = 0
    lags: list[float] = []  # how late the client's own loop wakes from a 1 ms sleep (ms)
    done = False

    async def conn() -> tuple[Any, Any]:
        if pool:
            return pool.pop()
        return await asyncio.open_connection("127.0.0.1", port)

    async def ticker() -> None:
        while not done:
            t = loop.time()
            await asyncio.sleep(0.001)
            lags.append((loop.time() - t - 0.001) * 1e3)

    async def one(i: int, j: int) -> None:
        nonlocal lost
        t0 = time.perf_counter()
        lag = (loop.time() - start - times[i]) * 1e3 if rate is not None else 0.0
        try:
            reused = bool(pool)
            c = await conn()
            t0 = time.perf_counter()
            try:
                code, data, keep = await asyncio.wait_for(_send(c, heads[j], bodies[j]), 30.0)
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                # the server closed this idle keep-alive connection (after its keep-alive timeout)
                # before the request reached it: send it again on a new one, as HTTP clients do
                c[1].close()
                c = await asyncio.open_connection("127.0.0.1", port)
                code, data, keep = await asyncio.wait_for(_send(c, heads[j], bodies[j]), 30.0)
            e2e = (time.perf_counter() - t0) * 1e3
        except Exception:
            lost += 1
            return
        if keep:
            pool.append(c)
        else:
            c[1].close()
        rec["i"].append(j)
        rec["t"].append(t0)
        rec["code"].append(code)
        rec["e2e"].append(e2e)
        rec["body"].append(data)
        rec["send_lag"].append(lag)

    for _ in range(min(64, inflight)):
        pool.append(await asyncio.open_connection("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    tick = asyncio.ensure_future(ticker())
    if rate is not None:
        for i, t in enumerate(times):
            delay = start + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, int(pick[i]))))
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    else:
        count = 0

        async def worker() -> None:
            nonlocal count
            while loop.time() - start < duration:
                k = count
                count += 1
                await one(k, int(pick[k % len(pick)]))

        await asyncio.gather(*[worker() for _ in range(inflight)])
    elapsed = loop.time() - start
    done = True
    await tick
    for r, w in pool:
        w.close()
    return {"sent": len(times) if rate is not None else len(rec["i"]) + lost, "lost": lost, "duration": duration,
            "elapsed": elapsed, "n_max": n_max, "loop_lag": lags, **rec}


def _client(args: tuple[Any, ...], out: Any, nice: int = 0, client_gc: bool = False) -> None:
    import gc

    pauses: list[float] = []
    t0 = [0.0]

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            t0[0] = time.perf_counter()
        elif info["generation"] == 2:
            pauses.append((time.perf_counter() - t0[0]) * 1e3)

    gc.callbacks.append(watch)
    if not client_gc:
        # the instrument must not pause: a full collection of the client's own objects (its
        # tasks, connections and records) stalled its loop for ~60 ms, and the answers it was
        # reading then looked late. A run is bounded (--duration), so is what it keeps.
        gc.collect()
        gc.freeze()
        gc.disable()
    refused = None
    if nice:
        try:
            os.nice(nice)  # a negative value (a higher priority) needs root or CAP_SYS_NICE
        except OSError as e:
            refused = f"os.nice({nice}) refused: {e.strerror}"
    import resource

    c0 = resource.getrusage(resource.RUSAGE_SELF)
    res = asyncio.run(_load(*args))
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    res["nice"], res["nice_refused"] = nice, refused
    res["cpu_s"] = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    res["client_gc2_ms"] = pauses
    out.put(res)


def run_client(port: int, bodies: list[bytes], rate: float | None, duration: float, deadline_ms: float, seed: int,
               inflight: int = 64, nice: int = 0, client_gc: bool = False) -> dict[str, Any]:
    """The client in its own process (spawned: it shares nothing with this one but the bodies),
    at niceness ``nice`` relative to this one."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_client, args=((port, bodies, rate, duration, deadline_ms, seed, inflight), q, nice,
                                          client_gc))
    p.start()
    res = q.get(timeout=duration + 180)
    p.join(30)
    return res


# ---------------------------------------------------------------------------------------------
# summaries


def summarize(res: dict[str, Any], labels: np.ndarray, deadline_ms: float) -> dict[str, Any]:
    code = np.asarray(res["code"], np.int64)
    e2e = np.asarray(res["e2e"])
    idx = np.asarray(res["i"], np.int64)
    bodies = [json.loads(b) for b in res["body"]]
    status = np.asarray([b.get("status", "?") for b in bodies])
    ok = code == 200
    sent = int(res["sent"])
    stage = np.asarray([b["stage"] for b, k in zip(bodies, ok) if k], np.int64)
    pred = np.asarray([b["label"] for b, k in zip(bodies, ok) if k], np.int64)
    in_time = ok & (e2e <= deadline_ms)
    refused = ~ok
    pct = (lambda a, q: float(np.percentile(a, q, method="inverted_cdf")) if len(a) else None)
    # where a late answer's time went: the server's own clock (arrival at its handler to the
    # answer) against the time outside it (the way in before the handler, the way back, the
    # client's own loop), and how late the client itself was
    total = np.asarray([b.get("total_ms", np.nan) for b in bodies], np.float64)
    outside = e2e - total
    late = ok & ~in_time
    lag = np.asarray(res.get("loop_lag", []), np.float64)
    send_lag = np.asarray(res.get("send_lag", []), np.float64)
    return {
        "offered_per_s": sent / res["duration"], "sent": sent,
        "in_time": int(in_time.sum()), "in_time_frac": float(in_time.sum() / max(sent, 1)),
        "goodput_per_s": float(in_time.sum() / res["duration"]),
        "answered": int(ok.sum()), "late": int((ok & ~in_time).sum()),
        "late_frac_of_answered": float((ok & ~in_time).sum() / max(int(ok.sum()), 1)),
        "shed": int((status == "shed").sum()), "shed_frac": float((status == "shed").sum() / max(sent, 1)),
        "queue_full": int((status == "queue_full").sum()), "other_refused": int((refused & (status != "shed")
                                                                                 & (status != "queue_full")).sum()),
        "lost": int(res["lost"]),
        "accuracy": float((pred == labels[idx[ok]]).mean()) if ok.any() else None,
        "mean_stage": float(stage.mean()) if ok.any() else None,
        "stage_counts": np.bincount(stage, minlength=1).tolist() if ok.any() else [],
        "p50_ms": pct(e2e[ok], 50), "p99_ms": pct(e2e[ok], 99),
        "refused_p99_ms": pct(e2e[refused], 99),
        "mean_batch": float(np.mean([b["batch"] for b, k in zip(bodies, ok) if k])) if ok.any() else None,
        "late_by_server_clock": int((ok & (total > deadline_ms)).sum()),
        "outside_p50_ms": pct(outside[ok], 50), "outside_p99_ms": pct(outside[ok], 99),
        "late_outside_p50_ms": pct(outside[late], 50), "late_server_p50_ms": pct(total[late], 50),
        "client_loop_lag_p50_ms": pct(lag, 50), "client_loop_lag_p99_ms": pct(lag, 99),
        "client_loop_lag_max_ms": float(lag.max()) if len(lag) else None,
        "client_loop_lag_over10ms_s": float(lag[lag > 10].sum() / 1e3) if len(lag) else None,
        "client_send_lag_p99_ms": pct(send_lag, 99),
        "client_nice": res.get("nice", 0), "client_nice_refused": res.get("nice_refused"),
        "client_cores": res["cpu_s"] / res["elapsed"] if res.get("cpu_s") is not None else None,
        "client_gc2_ms": res.get("client_gc2_ms", []),
    }


def gc_pauses(port: int) -> dict[str, float]:
    """The server's ``kdedge_gc_pause_seconds`` so far: count and sum per generation, and the
    collections longer than 10 ms."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^kdedge_gc_pause_seconds_(count|sum|bucket)\{generation="(\d)"(?:,le="([^"]+)")?\} (\S+)$',
                         text, re.M):
        kind, gen, le, v = m.groups()
        if kind == "bucket":
            if le == "0.01":
                out[f"gen{gen}_le10ms"] = float(v)
            continue
        out[f"gen{gen}_{kind}"] = float(v)
    for g in range(3):
        out[f"gen{g}_over10ms"] = out.get(f"gen{g}_count", 0.0) - out.pop(f"gen{g}_le10ms", 0.0)
    return out


def measure(srv: ServerProcess, bodies: list[bytes], labels: np.ndarray, load: float, capacity: float,
            args: argparse.Namespace, rep: int, nice: int, client_gc: bool, name: str,
            variant: str) -> dict[str, Any]:
    """One open-loop client run against ``srv``, summarised (and printed)."""
    c0, g0 = srv.cpu_s(), gc_pauses(srv.port)
    res = run_client(srv.port, bodies, load * capacity, args.duration, args.deadline_ms,
                     seed=int(load * 1000) + 7919 * rep, nice=nice, client_gc=client_gc)
    # the server idles while the client process starts and ends (outside elapsed)
    server_cores = (srv.cpu_s() - c0) / res["elapsed"]
    g1 = gc_pauses(srv.port)
    s = summarize(res, labels, args.deadline_ms)
    s.update(server=name, variant=variant, load=load, repeat=rep, server_cores=server_cores, client_gc=client_gc,
             gc={k: g1.get(k, 0.0) - g0.get(k, 0.0) for k in g1})
    gc2 = s["gc"]
    print(f"{(name + ' ' + variant).strip():13s} {load:4.1f}x  offered {s['offered_per_s']:6.0f}/s  in time "
          f"{100 * s['in_time_frac']:5.1f}%  late {s['late']:5d} (server's clock {s['late_by_server_clock']})  shed "
          f"{100 * s['shed_frac']:5.1f}%  lost {s['lost']}  acc {100 * (s['accuracy'] or 0):5.2f}%  stage "
          f"{s['mean_stage'] or 0:.2f}  p50 {s['p50_ms'] or 0:.1f} p99 {s['p99_ms'] or 0:.1f} ms  refused p99 "
          f"{s['refused_p99_ms'] or 0:.1f} ms  batch {s['mean_batch'] or 0:.1f}  outside p50/p99 "
          f"{s['outside_p50_ms'] or 0:.1f}/{s['outside_p99_ms'] or 0:.1f} ms  client nice {nice} gc "
          f"{'on' if client_gc else 'off'} loop lag p99/max {s['client_loop_lag_p99_ms'] or 0:.1f}/"
          f"{s['client_loop_lag_max_ms'] or 0:.1f} ms  cores: server {server_cores:.2f} client "
          f"{s['client_cores'] or 0:.2f}  gc2 {gc2.get('gen2_count', 0):.0f} ({1e3 * gc2.get('gen2_sum', 0):.1f} ms), "
          f"over 10 ms {sum(gc2.get(f'gen{g}_over10ms', 0) for g in range(3)):.0f}"
          + (f"  [{s['client_nice_refused']}]" if s["client_nice_refused"] else ""), flush=True)
    return s


def overhead(port: int, bodies: list[bytes], n: int) -> dict[str, Any]:
    """One request at a time on one keep-alive connection: end-to-end at the client minus the
    server's compute_ms (HTTP, decoding, queue, hand-offs, the client's own send/receive)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    rows = []
    for i in range(n + 50):
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        c.request("POST", "/v1/classify", body=body, headers={"X-Deadline-Ms": "1000"})
        r = c.getresponse()
        data = r.read()
        e2e = (time.perf_counter() - t0) * 1e3
        d = json.loads(data)
        if i >= 50 and r.status == 200:
            rows.append((e2e, d["compute_ms"], d["total_ms"]))
        time.sleep(0.002)  # a low rate: the worker is idle when each request arrives
    a = np.asarray(rows)
    e2e, comp, tot = a[:, 0], a[:, 1], a[:, 2]
    med = lambda v: float(np.median(v))  # noqa: E731
    return {"n": len(a), "e2e_p50_ms": med(e2e), "compute_p50_ms": med(comp),
            "overhead_p50_ms": med(e2e - comp), "overhead_p90_ms": float(np.percentile(e2e - comp, 90)),
            "http_p50_ms": med(e2e - tot), "queue_p50_ms": med(tot - comp)}


def plot(rows: list[dict[str, Any]], path: Path, title: str, accuracy: str = "accuracy of the answers (%)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("anytime", "o-"), ("fixed-full", "s--"), ("fixed-shallow", "^:")):
        rs = [r for r in rows if r["server"] == name and r.get("repeat", 0) == 0]
        if rs:  # with variants or client priorities: the first of each
            first = [rs[0].get(k) for k in ("variant", "client_nice", "client_gc")]
            rs = [r for r in rs if [r.get(k) for k in ("variant", "client_nice", "client_gc")] == first]
        x = [r["load"] for r in rs]
        ax1.plot(x, [100 * r["in_time_frac"] for r in rs], style, label=name)
        ax2.plot(x, [100 * (r["accuracy"] or 0) for r in rs], style, label=name)
    ax1.set(xlabel="offered load (x the full model's capacity)", ylabel="requests answered in time (%)",
            title="goodput", ylim=(0, 105))
    ax2.set(xlabel="offered load (x the full model's capacity)", ylabel=accuracy, title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdedge-bench-serve"))
    ap.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of training the demo")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier of the demo HNE")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--deadline-ms", type=float, default=50.0)
    ap.add_argument("--rates", default="0.5,1,2,4")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per rate")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margin-ms", type=float, default=2.0)
    ap.add_argument("--stat", default="p99")
    ap.add_argument("--shallow", type=int, default=1, help="stages of the fixed shallow server")
    ap.add_argument("--capacity", type=float, default=None, help="requests/s (skip measuring it)")
    ap.add_argument("--profile-runs", type=int, default=200)
    ap.add_argument("--no-profile", action="store_true", help="use the bundle's stored profile")
    ap.add_argument("--overhead-requests", type=int, default=500)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--servers", default="fixed-full,anytime,fixed-shallow", help="which servers, in this order")
    ap.add_argument("--repeat", type=int, default=1, help="run every server and rate this many times (each "
                    "server started anew)")
    ap.add_argument("--anytime-variants", default="", help="extra flags of the anytime server, variants separated "
                    "by |, e.g. '|--no-gc-freeze': each variant per repeat, the order rotated")
    ap.add_argument("--client-nice", default="0", help="niceness of the client process, e.g. 0,-10: each value "
                    "per rate and repeat, the order rotated (negative: the client gets the CPU first, so that it "
                    "measures the server rather than its own wait for the CPU; needs root)")
    ap.add_argument("--client-gc", default="off", help="the client's garbage collector during a run: off (frozen "
                    "and disabled: its full collections stalled the client's loop), on, or off,on (each per rate and "
                    "repeat, the order rotated)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    names = [v.strip() for v in args.servers.split(",") if v.strip()]
    if not names or any(n not in SERVERS for n in names):
        ap.error(f"--servers: choose from {', '.join(SERVERS)}")
    try:
        loads = [float(v) for v in args.rates.split(",")]
        nices = [int(v) for v in args.client_nice.split(",")]
    except ValueError:
        ap.error("--rates takes comma-separated numbers, --client-nice comma-separated integers")
    client_gcs = [v.strip() for v in args.client_gc.split(",")]
    if any(v not in ("off", "on") for v in client_gcs):
        ap.error("--client-gc: off, on, or off,on")
    clients = [(n, g == "on") for n in nices for g in client_gcs]
    variants = [v.strip() for v in args.anytime_variants.split("|")]

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or demo_bundle(args.work, args.width, args.epochs)
    if not args.no_profile:
        profile(bundle, args.max_batch, args.threads, args.profile_runs)
    from kdedge.runtime import open_bundle

    b = open_bundle(bundle)
    K = len(b.stages)
    bodies, labels, labelled = test_images(bundle, args.images)
    common = ["--deadline-ms", f"{args.deadline_ms:g}", "--max-batch", str(args.max_batch), "--threads",
              str(args.threads), "--margin-ms", f"{args.margin_ms:g}", "--stat", args.stat]
    known = {"fixed-full": ["--stages", str(K)], "anytime": [], "fixed-shallow": ["--stages", str(args.shallow)]}
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    capacity = args.capacity
    if capacity is None:
        srv = ServerProcess(bundle, common + known["fixed-full"])
        try:
            res = run_client(srv.port, bodies, None, max(args.duration, 5.0), 60_000.0, seed=99,
                             inflight=2 * args.max_batch)
        finally:
            srv.stop()
        capacity = float((np.asarray(res["code"]) == 200).sum() / res["elapsed"])
        extra["capacity_requests_per_s"] = capacity
        print(f"capacity of the fixed full-depth server: {capacity:.0f} requests/s", flush=True)
    rotate = (lambda xs, r: xs[r % len(xs):] + xs[:r % len(xs)])  # noqa: E731
    for rep in range(args.repeat):
        for name in names:
            for variant in (rotate(variants, rep) if name == "anytime" else [""]):
                flags = common + known[name] + variant.split()
                srv = ServerProcess(bundle, flags)
                try:
                    if name == "anytime" and args.overhead_requests > 0 and "overhead" not in extra:
                        extra["overhead"] = overhead(srv.port, bodies, args.overhead_requests)
                        print("overhead:", json.dumps(extra["overhead"]), flush=True)
                    for load in loads:
                        for nice, client_gc in rotate(clients, rep):
                            rows.append(measure(srv, bodies, labels, load, capacity, args, rep, nice, client_gc,
                                                name, variant))
                            time.sleep(1.0)
                finally:
                    extra.setdefault("stopped", {})[f"{name} {variant}".strip() + f" #{rep}"] = srv.stop()
    cpu = cpu_model()
    meta = {"bundle": str(bundle), "stages": K, "deadline_ms": args.deadline_ms, "max_batch": args.max_batch,
            "threads": args.threads, "margin_ms": args.margin_ms, "stat": args.stat, "duration_s": args.duration,
            "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "accuracy_per_stage": [e.accuracy.get(b.combine_default) for e in b.stages], "labels": labelled,
            "capacity_requests_per_s": capacity, **extra}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot, f"{b.family} ({bundle.name}), deadline {args.deadline_ms:g} ms, batches <= "
                              f"{args.max_batch}, capacity {capacity:.0f}/s; {cpu}, {os.cpu_count()} CPUs (shared)",
             "accuracy of the answers (%)" if "agreement" not in labelled else "agreement with the full model (%)")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
