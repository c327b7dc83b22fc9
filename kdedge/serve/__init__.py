"""Serving a bundle over HTTP: ``kdedge serve`` (install the ``serve`` extra: starlette, uvicorn,
prometheus_client).

Requests queue in a :class:`~kdedge.runtime.scheduler.Scheduler`, which batches them and gives
each the deepest answer its deadline and the backlog allow; the HTTP layer
(:mod:`kdedge.serve.app`) decodes bodies (:mod:`kdedge.serve.decode`), answers JSON and exports
Prometheus metrics (:mod:`kdedge.serve.metrics`). See docs/serving.md.

Example:
    >>> from kdedge.serve import BackgroundServer, build, create_app
    >>> runner, sched = build("hne.kdedge", deadline_ms=20, max_batch=32)
    >>> with BackgroundServer(create_app(runner, sched)) as srv:
    ...     print(srv.url)           # POST images to srv.url + "/v1/classify"
"""

from __future__ import annotations

from kdedge.serve.app import DEFAULT_MAX_BODY, create_app, model_summary
from kdedge.serve.decode import BodyError, decode_body
from kdedge.serve.server import BackgroundServer, bind, build, is_loopback, run_server

__all__ = ["BackgroundServer", "BodyError", "DEFAULT_MAX_BODY", "bind", "build", "create_app", "decode_body",
           "is_loopback", "model_summary", "run_server"]
