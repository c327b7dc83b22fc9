"""The HTTP application: Starlette routes over a :class:`~kdedge.runtime.scheduler.Scheduler`.

Why Starlette on uvicorn: ASGI is the standard Python server interface, Starlette is the small,
well-kept toolkit under FastAPI (routing, requests, responses, lifespan; no validation layer we
would not use), and uvicorn is its reference server; both are pure Python wheels with few
dependencies, so the ``serve`` extra stays small on a device. The handlers are async and never
block: decoding a small body happens inline, inference on the scheduler's worker thread, and
the answer comes back through ``loop.call_soon_threadsafe``. ``POST /v1/classify`` is a plain
ASGI callable that the outer application calls directly: the one route that carries the load
skips Starlette's middleware, routing, ``Request`` and ``Response`` objects (about 40 µs a
request on a 2-core host, docs/serving.md); the other routes, 404/405 and the lifespan go
through Starlette.

Routes:

- ``POST /v1/classify``: the body is an image file or a ``.npy`` (see :mod:`kdedge.serve.decode`);
  ``X-Deadline-Ms`` header or ``?deadline_ms=`` query: this request's deadline; ``?top_k=``
  (default 5). 200 with the answer; 503 when refused (``shed``, ``queue_full``, ``closed``,
  ``starting``; ``overloaded`` beyond ``limit_concurrency``), with ``Retry-After``; 4xx for
  bad input; every error body is ``{"status", "error"}`` with one line.
- ``GET /v1/health``: 200 ``{"status": "ready"}`` once warmed up, else 503.
- ``GET /v1/model``: the bundle's summary and the scheduler's configuration.
- ``GET /metrics``: Prometheus text format (:mod:`kdedge.serve.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from typing import Any, AsyncIterator, Callable

from kdedge.serve.decode import BodyError, decode_body, opencv

__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_TOP_K", "create_app", "model_summary"]

DEFAULT_MAX_BODY = 8 << 20  # bytes: a large JPEG; a request is one sample
DEFAULT_TOP_K = 5
DEADLINE_HEADER = "X-Deadline-Ms"  # header lookups ignore case


def _dump(obj: Any) -> bytes:
    """``obj`` as JSON; orjson writes non-finite floats as ``null`` (strict JSON), like
    :func:`kdedge.io.dumps_strict`, at a tenth of its cost per answer (docs/serving.md)."""
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    """A JSON response (Starlette's) for the routes other than classify."""
    from starlette.responses import Response

    return Response(_dump(obj), status_code=status, media_type="application/json", headers=headers)


class _Reply:
    """One JSON answer to send over ASGI as it is: status, ``obj``, extra headers. The classify
    route builds these instead of Starlette responses (no header object to build per request)."""

    __slots__ = ("status", "obj", "headers")

    def __init__(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status, self.obj, self.headers = status, obj, headers

    def messages(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The two ASGI messages that send it: the start (status, headers) and the body."""
        body = _dump(self.obj) if self.obj is not None else b""
        head = [(b"content-length", str(len(body)).encode())]
        if self.obj is not None:
            head.append((b"content-type", b"application/json"))
        if self.headers:
            head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        return {"type": "http.response.start", "status": self.status, "headers": head}, \
            {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # an ASGI app, as Starlette's are
        for message in self.messages():
            await send(message)


def _refusal(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply({"status": code, "error": message}, status, headers)


class _Call:
    """What the classify route reads of one request, straight from its ASGI scope: the values of
    a header or a query parameter by name (decoded as Starlette's ``Request`` would, built only
    when asked)."""

    __slots__ = ("scope", "_query")

    def __init__(self, scope: Any) -> None:
        self.scope, self._query = scope, None

    def header(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.scope["headers"] if k == key]

    def query(self, name: str) -> list[str]:
        if self._query is None:
            from urllib.parse import parse_qsl

            raw = self.scope.get("query_string", b"")
            self._query = parse_qsl(raw.decode("latin-1"), keep_blank_values=True) if raw else []
        return [v for k, v in self._query if k == name]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    return _json({"status": code, "error": message}, status, headers)


def model_summary(runner: Any, scheduler: Any) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: the bundle's family, input, classes, stages (members,
    MACs, validation accuracy), target and threads, the scheduler's configuration, and what
    decodes 8-bit PNG bodies (``opencv`` where installed, else ``pillow``)."""
    b = runner.bundle
    rule = runner.combine
    stages = [{"name": e.name, "members": e.members, "members_total": e.members_total, "macs": e.macs,
               "accuracy": e.accuracy.get(rule)} for e in b.stages]
    return {"bundle": str(b.path.name), "family": b.family, "input_shape": list(b.input_shape),
            "preprocessing": b.preprocessing, "classes": list(b.classes), "num_classes": b.num_classes,
            "combine": rule, "stages": stages, "prefixes": len(b.prefixes), "target": runner.target,
            "threads": runner.threads, "scheduler": scheduler.describe(),
            "png_decoder": "opencv" if opencv() is not None else "pillow"}


_NUMBER = re.compile(r"[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _one(request: _Call, query: str, what: str, header: str | None = None) -> tuple[str | None, str]:
    """The one value given as ``?query=`` and/or the ``header`` (each repeatable), stripped, and
    where it came from; the same value given more than once counts once, different ones are
    refused (ValueError)."""
    given = [(f"the {header} header", v) for v in request.header(header)] if header else []
    given += [(f"the {query} query parameter", v) for v in request.query(query)]
    if not given:
        return None, ""
    values = {v.strip() for _, v in given}
    if len(values) > 1:
        raise ValueError(f"{what} is given {len(given)} times ({', '.join(sorted({w for w, _ in given}))}) with "
                         f"different values; give one")
    where, raw = given[-1]
    return raw.strip(), where


def _deadline(request: _Call) -> float | None:
    raw, where = _one(request, "deadline_ms", "the deadline", DEADLINE_HEADER)
    if raw is None:
        return None
    from kdedge.runtime.scheduler import MAX_DEADLINE_MS

    v = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    if not (math.isfinite(v) and 0 < v <= MAX_DEADLINE_MS):
        raise ValueError(f"{where} must be a number of milliseconds > 0 and <= {MAX_DEADLINE_MS:g}, got {raw[:40]!r}")
    return v


def _top_k(request: _Call, classes: int) -> int:
    raw, _ = _one(request, "top_k", "top_k")
    if raw is None:
        return min(DEFAULT_TOP_K, classes)
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and 1 <= int(raw) <= classes):
        raise ValueError(f"top_k must be an integer from 1 to {classes} (the model's classes), got {raw[:40]!r}")
    return int(raw)


class _Disconnected(Exception):
    """The client went away before its body had arrived."""


async def _read_body(call: _Call, receive: Any, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (read no further than that); raises
    :class:`_Disconnected` when the client leaves first."""
    declared = call.header("content-length")
    if declared:
        try:
            if int(declared[0]) > limit:
                return None
        except ValueError:
            pass  # the server (h11/httptools) refuses a malformed Content-Length before we get here
    first = True
    chunks = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        if first and not message.get("more_body", False):
            return chunk if len(chunk) <= limit else None  # the usual case: one message, no copy
        first = False
        chunks += chunk
        if len(chunks) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(chunks)


class _Limit:
    """ASGI middleware: beyond ``limit`` classify requests in progress (read, decoded, queued or
    computing), answer 503 ``overloaded`` at once, before the body is read: the guard for when
    the HTTP layer, not the model, cannot keep up. The refusal is JSON like every error and is
    counted; the other endpoints are not limited (health and metrics stay readable)."""

    def __init__(self, app: Any, limit: int, metrics: Any) -> None:
        self.app, self.limit, self.metrics, self.active = app, limit, metrics, 0
        self.refusal = _refusal(503, "overloaded", f"more than {limit} requests are in progress "
                              "(--limit-concurrency); retry later", {"Retry-After": "1"})  # one response, sent again

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/classify":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self.metrics.count("overloaded")
            return await self.refusal(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _Asgi:
    """An ASGI callable that Starlette's ``Route`` calls as one (not as a request handler)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _Front:
    """The application uvicorn runs: ``POST /v1/classify`` straight to its ASGI callable, the
    rest (other routes, 404/405, the lifespan) to Starlette."""

    def __init__(self, routes: Any, classify: Callable[..., Any]) -> None:
        self.routes, self.classify = routes, classify

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/classify" and scope["method"] == "POST":
            return await self.classify(scope, receive, send)
        return await self.routes(scope, receive, send)


def create_app(runner: Any, scheduler: Any, *, max_body: int = DEFAULT_MAX_BODY, drain_timeout: float = 30.0,
               limit_concurrency: int | None = None, log: Callable[[str], None] | None = None) -> Any:
    """The Starlette application serving ``scheduler`` (over ``runner``'s bundle).

    Args:
        runner: the :class:`~kdedge.runtime.Runner` (its bundle decodes bodies, names classes).
        scheduler: the :class:`~kdedge.runtime.scheduler.Scheduler` answering requests.
        max_body: the largest body accepted, in bytes (413 beyond).
        drain_timeout: at shutdown, seconds to answer what is still queued (then refused).
        limit_concurrency: beyond this many classify requests in progress, answer 503
            ``overloaded`` before reading the body (None: no limit).
        log: where one-line notes go (unexpected errors); default: nowhere.

    Returns:
        the ASGI app; ``app.state.metrics`` is its :class:`~kdedge.serve.metrics.Metrics`.

    Example:
        >>> app = create_app(runner, Scheduler(runner, deadline_ms=20))
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    from kdedge.runtime.scheduler import OK
    from kdedge.serve.metrics import Metrics

    bundle = runner.bundle
    classes = list(bundle.classes)
    metrics = Metrics(scheduler, scheduler.num_stages, scheduler.max_batch)
    summary = model_summary(runner, scheduler)
    clock = scheduler.clock
    note = log or (lambda line: None)
    refused = {"shed", "queue_full", "closed"}

    def resolve(fut: asyncio.Future, answer: Any) -> None:
        if not fut.done():
            fut.set_result(answer)

    def guarded(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """An unexpected error becomes a one-line JSON 500 here (Starlette's own handler would
        re-raise it for the server to log with its traceback); the server keeps serving."""

        async def wrapper(request: Any) -> Any:
            try:
                return await handler(request)
            except asyncio.CancelledError:
                # uvicorn cancels what is still in progress when the shutdown's --drain-timeout ends
                # (a body still arriving, say): answer it rather than let uvicorn log a traceback
                metrics.count("closed")
                return _error(503, "closed", "the server shut down before this request was answered "
                                             "(--drain-timeout ended)", {"Retry-After": "1"})
            except Exception as e:
                return await internal(request, e)

        return wrapper

    async def classify(call: _Call, receive: Any) -> _Reply:
        arrival = clock()
        try:
            deadline = _deadline(call)
            top_k = _top_k(call, len(classes))
        except ValueError as e:
            metrics.count("bad_request")
            return _refusal(400, "bad_request", str(e))
        try:
            body = await _read_body(call, receive, max_body)
        except _Disconnected:  # the client went away mid-body: nothing to answer, nothing wrong here
            metrics.count("disconnected")
            return _Reply(None, 400)
        if body is None:
            metrics.count("bad_request")
            return _refusal(413, "bad_request", f"the body is larger than the {max_body:,} bytes this server accepts "
                                                "(--max-body); a request is one image or one sample")
        if scheduler.ready:  # what must be shed is refused before any time goes into decoding it
            early = scheduler.precheck(deadline, arrival=arrival)
            if early is not None:
                metrics.answered(early)
                return _Reply(early.to_dict(), 503, {"Retry-After": "1"})
        try:
            x = decode_body(body, bundle)
        except BodyError as e:
            metrics.count("bad_request")
            return _refusal(e.status, "bad_request", str(e))
        if not scheduler.ready:
            status = "closed" if scheduler.closing or scheduler.failure is not None else "starting"
            metrics.count(status)
            why = ("the server is shutting down" if scheduler.closing else
                   f"the server cannot run the model: {scheduler.failure}" if scheduler.failure is not None else
                   "the model is warming up; wait until GET /v1/health answers 200")
            return _refusal(503, status, why, {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(answer: Any) -> None:
            try:
                loop.call_soon_threadsafe(resolve, fut, answer)
            except RuntimeError:  # the loop has closed: the server was stopped with the request unanswered
                pass

        scheduler.submit(x, deadline, arrival=arrival, callback=done)
        answer = await fut
        metrics.answered(answer)
        d = answer.to_dict()
        if answer.status == OK:
            d["top_k"] = answer.top_k(top_k, classes)
            return _Reply(d)
        if answer.status in refused:
            return _Reply(d, 503, {"Retry-After": "1"})
        return _Reply(d, 422)  # the model computed NaN/inf for this input

    async def classify_asgi(scope: Any, receive: Any, send: Any) -> None:
        """``POST /v1/classify`` as an ASGI callable, guarded like the other routes: an
        unexpected error is a one-line JSON 500, a cancellation at shutdown a 503."""
        try:
            messages = (await classify(_Call(scope), receive)).messages()  # its JSON written here, guarded too
        except asyncio.CancelledError:
            # uvicorn cancels what is still in progress when the shutdown's --drain-timeout ends
            # (a body still arriving, say): answer it rather than let uvicorn log a traceback
            metrics.count("closed")
            messages = _refusal(503, "closed", "the server shut down before this request was answered "
                                               "(--drain-timeout ended)", {"Retry-After": "1"}).messages()
        except Exception as e:
            messages = _refusal(500, "error", unexpected("POST", scope.get("path", ""), e)).messages()
        for message in messages:
            await send(message)

    async def health(request: Any) -> Any:
        if scheduler.failure is not None:
            return _error(503, "failed", f"the model cannot run: {scheduler.failure}")
        if scheduler.closing:
            return _json({"status": "closing"}, 503)
        if not scheduler.ready:
            return _json({"status": "starting"}, 503)
        return _json({"status": "ready", "queue": scheduler.queue_length})

    async def model(request: Any) -> Any:
        return _json(summary)

    async def prometheus(request: Any) -> Any:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    async def http_error(request: Any, exc: Any) -> Any:
        code = int(getattr(exc, "status_code", 500))
        what = {404: f"no such endpoint {request.url.path}; the endpoints are POST /v1/classify, GET /v1/health, "
                     "GET /v1/model, GET /metrics",
                405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(code, "bad_request", what.get(code, str(getattr(exc, "detail", ""))))

    def unexpected(method: str, path: str, exc: Exception) -> str:
        line = f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        note(f"{method} {path}: {line}")
        metrics.count("internal_error")
        return line

    async def internal(request: Any, exc: Exception) -> Any:
        return _error(500, "error", unexpected(request.method, request.url.path, exc))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        metrics.gc.install()
        try:
            yield
            # uvicorn has stopped accepting and waited for the requests in flight; answer what is left
            await asyncio.get_running_loop().run_in_executor(None, lambda: scheduler.close(drain=True,
                                                                                          timeout=drain_timeout))
        finally:
            metrics.gc.remove()

    routes = Starlette(routes=[Route("/v1/classify", _Asgi(classify_asgi), methods=["POST"]),
                            Route("/v1/health", guarded(health), methods=["GET"]),
                            Route("/v1/model", guarded(model), methods=["GET"]),
                            Route("/metrics", guarded(prometheus), methods=["GET"])],
                       exception_handlers={HTTPException: http_error, Exception: internal}, lifespan=lifespan)
    app: Any = _Front(routes, classify_asgi)
    if limit_concurrency is not None:
        app = _Limit(app, limit_concurrency, metrics)
    app.state = routes.state
    app.state.metrics = metrics
    return app
