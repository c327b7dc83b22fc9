"""Where a served request's time goes besides the model (results in docs/serving.md). Not a
test: it times things.

One request at a time at a low rate (the worker is idle when each arrives), on the anytime
server of ``kdedge serve``:

1. **In process, no HTTP**: a :class:`~kdedge.runtime.scheduler.Scheduler` over a
   :class:`~kdedge.runtime.Runner`, fed from an asyncio loop the way the server feeds it
   (``submit`` with a callback that resolves a future through ``loop.call_soon_threadsafe``),
   against a plain thread waiting on the ticket, against ``Runner.run`` called directly:
   submit to answer minus ``compute_ms`` is what the queue and the two thread hand-offs cost.
2. **Over HTTP**, ``kdedge serve`` in a subprocess on a loopback port, as it starts by default
   and with ``--realtime --cpu-latency 0`` (the CPUs held out of deep idle states, which a
   request at a low rate otherwise wakes them from), in alternating blocks; two clients in
   alternation on two keep-alive connections: ``http.client`` (the standard library's client,
   which parses headers in Python) and a raw socket that sends prebuilt request bytes and reads
   the response by its ``Content-Length``. Per request: end-to-end at the client, minus the
   server's ``compute_ms`` (the overhead), split into ``total_ms − compute_ms`` (in the server,
   from the handler's start: body, decode, queue, hand-off) and the rest (HTTP parsing and
   writing on both sides, the loop's wake-up with the answer, the client).
3. **HTTP alone**: a Starlette endpoint answering a constant under the same uvicorn, in its own
   process, and the raw client; beside it, in rotating blocks, a bare ASGI callable doing the same
   (what Starlette's routing, request and response objects add), an asyncio protocol answering
   without any HTTP library (the floor of Python's event loop and sockets), and the bare callable
   under granian, a Rust HTTP server, when it is installed (``pip install granian``).
4. **Inside the server**: the real application in this process (uvicorn on a thread), the raw
   client in a child process, timestamps taken by wrapping what the handler calls: reading the
   body, decoding, submitting, the worker's wake-up, the loop's wake-up, the answer's JSON; PNG
   bodies decoded by Pillow and, where OpenCV is installed, by OpenCV, in alternating halves.
   (Part 2 then also runs the server with ``KDEDGE_OPENCV=0``: Pillow alone.)
5. **The answer's JSON, then and now**, in process, each write after a model run (so with the
   caches the model leaves): the answer ranked once per batch in the worker and written by
   orjson (what the server does) against ranked per answer by numpy and written by
   :func:`kdedge.io.dumps_strict` (what it did before), alternating.

    .venv/bin/python bench/bench_serve_overhead.py                     # the demo HNE (trained once)
    .venv/bin/python bench/bench_serve_overhead.py --bundle B --requests 2000 --json /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdedge.device import cpu_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import ServerProcess, demo_bundle, profile, test_images  # noqa: E402

GAP_S = 0.002  # between requests (--gap-ms): the worker is idle when each arrives


def _p(v: list[float], q: float = 50) -> float:
    return float(np.percentile(np.asarray(v), q))


def in_process(bundle: Path, n: int, threads: int) -> dict[str, Any]:
    """Rows of part 1: direct runner calls, a thread waiting on the ticket, the asyncio path."""
    from kdedge.runtime import Full, Runner
    from kdedge.runtime.scheduler import Scheduler

    with Runner(bundle, threads=threads) as runner:
        x = np.zeros((1, *runner.input_shape), np.float32)
        runner.warmup((1,))
        sched = Scheduler(runner, deadline_ms=1000.0, max_batch=8)
        sched.wait_ready(120)
        out: dict[str, list[float]] = {"runner.run": [], "thread: submit to answer": [],
                                       "thread: minus compute_ms": [], "asyncio: submit to answer": [],
                                       "asyncio: minus compute_ms": []}
        loop = asyncio.new_event_loop()

        async def one_async() -> tuple[float, float]:
            fut = loop.create_future()

            def done(answer: Any) -> None:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(answer))

            t0 = time.perf_counter()
            sched.submit(x, arrival=sched.clock(), callback=done)
            a = await fut
            return (time.perf_counter() - t0) * 1e3, a.compute_ms

        try:
            for i in range(n + 50):  # interleaved, one of each per round
                t0 = time.perf_counter()
                runner.run(x, Full())
                t_run = (time.perf_counter() - t0) * 1e3
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                a = sched.submit(x).result(30)
                t_thread = (time.perf_counter() - t0) * 1e3
                time.sleep(GAP_S)
                t_async, comp_async = loop.run_until_complete(one_async())
                time.sleep(GAP_S)
                if i >= 50:
                    out["runner.run"].append(t_run)
                    out["thread: submit to answer"].append(t_thread)
                    out["thread: minus compute_ms"].append(t_thread - a.compute_ms)
                    out["asyncio: submit to answer"].append(t_async)
                    out["asyncio: minus compute_ms"].append(t_async - comp_async)
        finally:
            loop.close()
            sched.close()
    return {k: {"p50_ms": _p(v), "p90_ms": _p(v, 90), "n": len(v)} for k, v in out.items()}


def answer_json(bundle: Path, n: int, threads: int) -> dict[str, Any]:
    """Rows of part 5: one answer's top-5 and JSON written the server's way and the old way."""
    import orjson

    from kdedge.io import dumps_strict
    from kdedge.runtime import Full, Runner
    from kdedge.runtime.tickets import OK, RANKED, Answer, rank

    def now_way(p: np.ndarray, classes: list[str]) -> bytes:
        top, vals = rank(p[None], RANKED)  # in the worker, once per batch (here a batch of one)
        top, vals = top.tolist(), vals.tolist()
        a = Answer(1, OK, probs=p, label=top[0][0], class_name=classes[top[0][0]], confidence=vals[0][0],
                   ranked=tuple(zip(top[0], vals[0])))
        d = a.to_dict()
        d["top_k"] = a.top_k(RANKED, classes)
        return orjson.dumps(d, option=orjson.OPT_SERIALIZE_NUMPY)

    def old_way(p: np.ndarray, classes: list[str]) -> bytes:
        label = int(p.argmax())
        a = Answer(1, OK, probs=p, label=label, class_name=classes[label], confidence=float(p[label]))
        d = a.to_dict()
        d["top_k"] = a.top_k(RANKED, classes)  # nothing ranked: numpy ranks it here
        return dumps_strict(d, indent=None).encode()

    ways = {"ranked in the worker, orjson (now)": now_way, "ranked per answer, dumps_strict (before)": old_way}
    out: dict[str, list[float]] = {k: [] for k in ways}
    with Runner(bundle, threads=threads) as runner:
        x = np.zeros((1, *runner.input_shape), np.float32)
        runner.warmup((1,))
        classes = list(runner.classes)
        names = list(ways)
        for i in range(n + 50):
            for j in range(len(names)):
                k = names[(i + j) % len(names)]
                p = np.array(runner.run(x, Full()).probs[0], dtype=np.float64)
                t0 = time.perf_counter()
                ways[k](p, classes)
                if i >= 50:
                    out[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50_ms": _p(v), "p90_ms": _p(v, 90), "n": len(v)} for k, v in out.items()}


class RawClient:
    """Prebuilt HTTP/1.1 requests on one keep-alive socket; the response read by Content-Length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, body: bytes) -> tuple[int, bytes]:
        head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Deadline-Ms: 1000\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        header, _, rest = self.buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", header)
        if m is None:
            raise ConnectionError(f"a response without Content-Length: {header[:200]!r}")
        size = int(m.group(1))
        while len(rest) < size:
            rest += self._recv()
        self.buf = rest[size:]
        return int(header.split(b" ", 2)[1]), rest[:size]

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def over_http(bundle: Path, bodies: list[bytes], n: int, threads: int,
              variants: dict[str, tuple[list[str], dict[str, str]]], rounds: int) -> dict[str, Any]:
    """Rows of part 2: per server variant and client, in ``rounds`` rounds that start each
    variant's server in turn (the variants alternate block by block; a server holding the CPUs
    out of idle states with ``--cpu-latency`` holds the whole machine, so no two run at once)."""
    import http.client

    clients = ("http.client", "raw socket")
    rows = {(v, c): {"e2e": [], "overhead": [], "in_server": [], "outside": []} for v in variants for c in clients}
    per_block = max(1, n // rounds)
    for _ in range(rounds):
        for vname, (flags, env) in variants.items():
            srv = ServerProcess(bundle, ["--deadline-ms", "1000", "--max-batch", "8", "--threads", str(threads),
                                         *flags], env)
            try:
                std = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
                raw = RawClient(srv.port)
                for i in range(per_block + 20):  # the first 20 of a block warm the new server up
                    body = bodies[i % len(bodies)]
                    for c in clients:
                        t0 = time.perf_counter()
                        if c == "http.client":
                            std.request("POST", "/v1/classify", body=body, headers={"X-Deadline-Ms": "1000"})
                            r = std.getresponse()
                            status, data = r.status, r.read()
                        else:
                            status, data = raw.request(body)
                        e2e = (time.perf_counter() - t0) * 1e3
                        d = json.loads(data)
                        if i >= 20 and status == 200:
                            v = rows[(vname, c)]
                            v["e2e"].append(e2e)
                            v["overhead"].append(e2e - d["compute_ms"])
                            v["in_server"].append(d["total_ms"] - d["compute_ms"])
                            v["outside"].append(e2e - d["total_ms"])
                        time.sleep(GAP_S)
                std.close()
                raw.close()
            finally:
                srv.stop()
    return {f"{v} / {c}": {k: {"p50_ms": _p(x), "p90_ms": _p(x, 90)} for k, x in r.items()} | {"n": len(r["e2e"])}
            for (v, c), r in rows.items()}


def has_opencv() -> bool:
    import importlib.util

    return importlib.util.find_spec("cv2") is not None


# server variants of part 2: flags, environment
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}), "--realtime --cpu-latency 0": (["--realtime", "--cpu-latency", "0"], {})}
if has_opencv():  # the default then decodes PNG with OpenCV; beside it, Pillow alone
    VARIANTS["default, KDEDGE_OPENCV=0 (Pillow)"] = ([], {"KDEDGE_OPENCV": "0"})


_CONSTANT = b'{"compute_ms": 0.0, "total_ms": 0.0}'


async def bare_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI callable: reads the body, answers :data:`_CONSTANT` (part 3)."""
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        m = await receive()
        more = m.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_CONSTANT)).encode())]})
    await send({"type": "http.response.body", "body": _CONSTANT})


def _protocol_server(sock: socket.socket) -> None:
    """An asyncio protocol on the same event loop as uvicorn's, no HTTP library: it finds the
    head's end and Content-Length with bytes methods and writes a prebuilt response. What is
    left of HTTP in Python once parsing is as cheap as it gets."""
    import asyncio

    response = (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(_CONSTANT)}"
                "\r\n\r\n").encode() + _CONSTANT

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head, size = self.buf[:end].lower(), 0
                if (at := head.find(b"content-length:")) >= 0:
                    stop = head.find(b"\r\n", at)
                    size = int(head[at + 15:stop if stop >= 0 else len(head)])
                if len(self.buf) < end + 4 + size:
                    return
                self.buf = self.buf[end + 4 + size:]
                self.transport.write(response)

    try:
        import uvloop

        uvloop.install()  # as uvicorn's default loop, where it is installed
    except ImportError:
        pass

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, sock=sock)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


def floor_server(kind: str) -> None:
    """(a child) An endpoint that reads the body and answers a constant: the HTTP layer's own
    cost. ``kind``: ``starlette`` (a route under uvicorn, as ``kdedge serve`` runs it), ``asgi``
    (:func:`bare_asgi` under the same uvicorn) or ``protocol`` (:func:`_protocol_server`, no HTTP
    library). Prints its port, serves until SIGINT or SIGTERM."""
    import signal

    from kdedge.serve.server import bind, run_server

    sock = bind("127.0.0.1", 0)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    if kind == "protocol":
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        _protocol_server(sock)
        return
    if kind == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        async def classify(request: Any) -> Any:
            await request.body()
            return Response(_CONSTANT, media_type="application/json")

        app: Any = Starlette(routes=[Route("/v1/classify", classify, methods=["POST"])])
    else:
        app = bare_asgi
    run_server(app, sock)


def _granian(port: int) -> list[str]:
    """The command of :func:`bare_asgi` under granian (a Rust HTTP server running ASGI apps), one
    worker, HTTP/1.1; [] when granian is not installed."""
    import importlib.util

    if importlib.util.find_spec("granian") is None:
        return []
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--http", "1", "--log-level", "warning", "--working-dir", str(Path(__file__).parent),
            "bench_serve_overhead:bare_asgi"]


FLOORS = {"starlette": "a constant Starlette endpoint under uvicorn, as the server",
          "asgi": "a bare ASGI callable under the same uvicorn",
          "protocol": "an asyncio protocol on the same loop, no HTTP library",
          "granian": "the bare ASGI callable under granian (Rust HTTP), if installed"}


def http_floor(bodies: list[bytes], n: int, rounds: int) -> dict[str, Any]:
    """Part 3: the raw client against each of :data:`FLOORS`, each server in its own process,
    in blocks whose order rotates from round to round."""
    import subprocess

    procs: dict[str, Any] = {}
    ports: dict[str, int] = {}
    try:
        for k in FLOORS:
            if k == "granian":
                with socket.socket() as probe:  # a free port for granian, which binds itself
                    probe.bind(("127.0.0.1", 0))
                    ports[k] = probe.getsockname()[1]
                if not (cmd := _granian(ports[k])):
                    continue
                procs[k] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                continue
            procs[k] = subprocess.Popen([sys.executable, __file__, "--floor-server", k], stderr=subprocess.PIPE,
                                        text=True)
            m = re.search(r":(\d+)$", procs[k].stderr.readline().strip())
            if m is None:
                raise RuntimeError(f"the {k} floor server did not start")
            ports[k] = int(m.group(1))
        clients = {}
        for k in procs:
            end = time.monotonic() + 30
            while True:
                try:
                    clients[k] = RawClient(ports[k])
                    clients[k].request(bodies[0])
                    break
                except OSError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.05)
        kinds = list(clients)
        e2e: dict[str, list[float]] = {k: [] for k in kinds}
        block = max(1, n // rounds)
        for r in range(rounds):
            for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                for i in range(block + 50):
                    t0 = time.perf_counter()
                    clients[k].request(bodies[i % len(bodies)])
                    if i >= 50:
                        e2e[k].append((time.perf_counter() - t0) * 1e3)
                    time.sleep(GAP_S)
        for c in clients.values():
            c.close()
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
    return {k: {"p50_ms": _p(v), "p90_ms": _p(v, 90), "n": len(v)} for k, v in e2e.items()}


def breakdown(bundle: Path, n: int, threads: int, decoder: str = "") -> dict[str, Any]:
    """Part 4: the real application in this process (uvicorn on a thread), the raw client in
    another process; timestamps taken inside the handler by wrapping the functions it calls
    (these wrappers add a few microseconds to what they time). ``decoder``: ``pillow`` or
    ``opencv`` for PNG bodies ("": the server's choice)."""
    import subprocess

    import kdedge.serve.app as app_mod
    import kdedge.serve.decode as decode_mod
    from kdedge.serve.server import BackgroundServer, build

    pc = time.perf_counter
    cur: dict[str, float] = {}
    rec: dict[str, list[float]] = {}
    saved = (app_mod._deadline, app_mod.decode_body, app_mod._dump)

    def deadline(request: Any) -> Any:  # the handler's first call after taking the arrival time
        cur.clear()
        cur["arrival"] = pc()
        return saved[0](request)

    def decode(body: bytes, b: Any) -> Any:
        cur["decode"] = pc()
        x = saved[1](body, b)
        cur["decoded"] = pc()
        return x

    def as_json(obj: Any) -> bytes:
        r = saved[2](obj)
        if "compute_ms" in obj and "resumed" in cur:  # an answer, every step of it timed
            cur["json"] = pc()
            for key, v in cur.items():
                rec.setdefault(key, []).append(v)
        return r

    app_mod._deadline, app_mod.decode_body, app_mod._dump = deadline, decode, as_json
    looked_up = dict(decode_mod._OPENCV)
    if decoder:
        decode_mod._OPENCV.clear()
        decode_mod._OPENCV["module"] = None if decoder == "pillow" else decode_mod.opencv()
        if decoder == "opencv" and decode_mod._OPENCV["module"] is None:
            raise SystemExit("OpenCV cannot decode here: it is not installed (pip install opencv-python-headless) "
                             "or KDEDGE_OPENCV=0 is set")
    runner, sched = build(bundle, threads=threads, deadline_ms=1000.0, max_batch=8)
    try:
        submit = sched.submit

        def timed_submit(x: Any, d: Any = None, *, arrival: Any = None, callback: Any = None) -> Any:
            cur["submit"] = pc()

            def cb(a: Any) -> None:
                cur["callback"] = pc()
                callback(a)

            t = submit(x, d, arrival=arrival, callback=cb)
            cur["submitted"] = pc()
            return t

        take = sched._take

        def timed_take(timeout: Any) -> Any:
            batch = take(timeout)
            if batch:
                cur["taken"] = pc()
            return batch

        run = runner.run

        def timed_run(*a: Any, **k: Any) -> Any:
            cur["run"] = pc()
            try:
                return run(*a, **k)
            finally:
                cur["ran"] = pc()

        sched.submit = timed_submit
        sched._take = timed_take
        runner.run = timed_run
        app = app_mod.create_app(runner, sched)
        answered = app.state.metrics.answered

        def timed_answered(a: Any) -> None:
            cur["resumed"] = pc()
            answered(a)

        app.state.metrics.answered = timed_answered
        sched.wait_ready(120)
        with BackgroundServer(app) as srv:
            code = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
                    f"from bench_serve import test_images\nfrom bench_serve_overhead import RawClient\n"
                    f"bodies, _, _ = test_images({str(bundle)!r}, 200)\nc = RawClient({srv.port})\n"
                    f"for i in range({n + 50}):\n    c.request(bodies[i % len(bodies)]); time.sleep({GAP_S!r})\n")
            subprocess.run([sys.executable, "-c", code], check=True)
    finally:
        app_mod._deadline, app_mod.decode_body, app_mod._dump = saved
        decode_mod._OPENCV.clear()
        decode_mod._OPENCV.update(looked_up)
        sched.close()
        runner.close()
    a = {k: np.asarray(v[50:]) for k, v in rec.items()}
    steps = [("arrival", "decode", "read the body, precheck"), ("decode", "decoded", "decode the image"),
             ("decoded", "submit", "to submit"), ("submit", "submitted", "submit: the input check, admission"),
             ("submitted", "taken", "the worker wakes and takes it"), ("taken", "run", "to the runner's call"),
             ("submit", "run", "queue: the three above"), ("run", "ran", "(the model: Runner.run)"),
             ("ran", "callback", "the worker answers: top-k, the answer, counts"),
             ("callback", "resumed", "the event loop wakes with the answer"),
             ("resumed", "json", "metrics, top-k, the answer's JSON")]
    return {what: list((a[y] - a[x]) * 1e3) for x, y, what in steps}


def inside_server(bundle: Path, n: int, threads: int) -> dict[str, Any]:
    """Part 4 for each PNG decoder (Pillow, and OpenCV where installed), in alternating halves:
    ``{decoder: {step: {p50_ms, p90_ms}}}``."""
    from kdedge.serve.decode import opencv

    decoders = ("pillow", "opencv") if opencv() is not None else ("pillow",)
    samples: dict[str, dict[str, list[float]]] = {d: {} for d in decoders}
    for half in range(2):
        for d in (decoders if half == 0 else decoders[::-1]):
            for step, v in breakdown(bundle, max(1, n // 2), threads, d).items():
                samples[d].setdefault(step, []).extend(v)
    return {d: {step: {"p50_ms": _p(v), "p90_ms": _p(v, 90), "n": len(v)} for step, v in steps.items()}
            for d, steps in samples.items()}


def main() -> None:
    global GAP_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdedge-bench-serve"))
    ap.add_argument("--bundle", type=Path, default=None, help="default: the demo HNE, trained and exported once")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000, help="per path (after 50 warm-up requests)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="blocks per server variant, alternating")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--gap-ms", type=float, default=GAP_S * 1e3,
                    help="pause between two requests (0: back to back, the CPUs never idle between them)")
    ap.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (e.g. 3: HTTP alone)")
    ap.add_argument("--floor-server", choices=("starlette", "asgi", "protocol"), help=argparse.SUPPRESS)  # internal: part 3
    args = ap.parse_args()
    if not 0 <= args.gap_ms <= 1000:
        ap.error("--gap-ms takes 0 to 1000")
    GAP_S = args.gap_ms / 1e3
    if args.floor_server:
        floor_server(args.floor_server)
        return
    try:
        parts = {int(v) for v in args.parts.split(",")}
    except ValueError:
        ap.error("--parts takes comma-separated numbers 1-5")
    if not parts or not parts <= {1, 2, 3, 4, 5}:
        ap.error("--parts takes comma-separated numbers 1-5")
    if args.requests < 1:
        ap.error("--requests must be positive")
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or demo_bundle(args.work, 1.0, args.epochs)
    if parts & {1, 2, 4, 5}:
        profile(bundle, 8, args.threads, 50)  # the scheduler plans from the bundle's latency profile
    if 2 in parts:
        profile(bundle, 8, args.threads, 50, "--realtime")  # and the real-time server from its own
    bodies, _, _ = test_images(bundle, 200)
    t0 = time.perf_counter()
    part1 = in_process(bundle, args.requests, args.threads) if 1 in parts else {}
    part2 = over_http(bundle, bodies, args.requests, args.threads, VARIANTS, args.rounds) if 2 in parts else {}
    part3 = http_floor(bodies, args.requests, args.rounds) if 3 in parts else None
    part4 = inside_server(bundle, args.requests, args.threads) if 4 in parts else {}
    part5 = answer_json(bundle, args.requests, args.threads) if 5 in parts else {}
    cpu = cpu_model()
    print(f"\n{cpu}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.requests} requests per path, "
          f"one at a time, {GAP_S * 1e3:g} ms apart; p50 (p90) ms\n")
    if part1:
        print("| in process, no HTTP | p50 | p90 |\n|---|---|---|")
        for k, v in part1.items():
            print(f"| {k} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} |")
    if part2:
        print("\n| over HTTP: server / client | end-to-end | overhead (e2e − compute_ms) | in the server before the "
              "batch (total − compute) | outside the handler (e2e − total) |\n|---|---|---|---|---|")
        for c, r in part2.items():
            cells = " | ".join(f"{r[k]['p50_ms']:.3f} ({r[k]['p90_ms']:.3f})"
                               for k in ("e2e", "overhead", "in_server", "outside"))
            print(f"| {c} | {cells} |")
    if part3 is not None:
        print("\n| HTTP alone, raw socket, one request at a time | p50 | p90 |\n|---|---|---|")
        for k, v in part3.items():
            print(f"| {FLOORS[k]} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} |")
        print()
    if part4:
        decoders = list(part4)
        print("| inside the default server, one request | " + " | ".join(f"PNG by {d}: p50 (p90)" for d in decoders)
              + " |\n|---|" + "---|" * len(decoders))
        for step in part4[decoders[0]]:
            print(f"| {step} | " + " | ".join(f"{part4[d][step]['p50_ms']:.3f} ({part4[d][step]['p90_ms']:.3f})"
                                             for d in decoders) + " |")
    if part5:
        print("\n| one answer's top-5 and JSON, after a model run | p50 | p90 |\n|---|---|---|")
        for k, v in part5.items():
            print(f"| {k} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        from kdedge.io import atomic_write_text, dumps_strict

        atomic_write_text(args.json, dumps_strict({"cpu": cpu, "cpus": os.cpu_count(), "bundle": str(bundle),
                                                   "requests": args.requests, "gap_ms": args.gap_ms, "in_process": part1,
                                                   "over_http": part2, "http_floor": part3,
                                                   "inside_server": part4, "answer_json": part5}))


if __name__ == "__main__":
    main()
