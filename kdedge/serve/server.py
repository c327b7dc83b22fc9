"""Running the application: the runner and scheduler a server needs, a listening socket, and
uvicorn in the foreground (``kdedge serve``) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["BackgroundServer", "bind", "build", "is_loopback", "run_server"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free port, read it back with
    ``getsockname()``), for uvicorn to listen on.

    Raises:
        ValueError: a port outside 0 … 65535.
        OSError: the address cannot be bound (in use, not this machine's); the message says which.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0 … 65535, got {port!r}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; give an address of this machine "
                      "(--host 127.0.0.1)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (0: any free "
                      "one)") from None
    sock.set_inheritable(True)
    return sock


def build(bundle: Any, *, target: str = "onnx", threads: Any = None, device: str | None = None,
          realtime: Any = None, profile: Any = "auto", **scheduler_args: Any) -> tuple[Any, Any]:
    """The :class:`~kdedge.runtime.Runner` and :class:`~kdedge.runtime.scheduler.Scheduler` a
    server runs; the scheduler's worker starts warming up at once.

    With ``realtime``, the runner is created on a short-lived thread: the real-time policy goes
    to the sessions' threads and to the scheduler's worker (on its first request), not to the
    thread that will run the event loop.

    Raises:
        BundleError, ProfileError, RealtimeError, ValueError: as the runner and scheduler do.
    """
    from kdedge.runtime import Runner
    from kdedge.runtime.scheduler import Scheduler

    made: dict[str, Any] = {}

    def make() -> None:
        try:
            made["runner"] = Runner(bundle, target=target, threads=threads, device=device, realtime=realtime,
                                    profile=profile)
        except BaseException as e:  # re-raised on the calling thread
            made["error"] = e

    if realtime is not None:
        t = threading.Thread(target=make, name="kdedge-runner-setup")
        t.start()
        t.join()
    else:
        make()
    if "error" in made:
        raise made["error"]
    runner = made["runner"]
    try:
        return runner, Scheduler(runner, **scheduler_args)
    except BaseException:
        runner.close()
        raise


def _config(app: Any, log_level: str, graceful_s: float | None) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=graceful_s)


def run_server(app: Any, sock: socket.socket, *, log_level: str = "warning", graceful_s: float | None = 30.0) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM, then shut down gracefully: stop
    accepting, let the requests in flight be answered (at most ``graceful_s`` seconds), run the
    app's shutdown (the scheduler answers what is queued), return.

    Raises:
        KeyboardInterrupt: never for SIGINT/SIGTERM: both end in a clean return.
    """
    import signal

    import uvicorn

    server = uvicorn.Server(_config(app, log_level, graceful_s))
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place that ends in a clean return instead of a KeyboardInterrupt or a kill by SIGTERM
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class BackgroundServer:
    """uvicorn serving ``app`` on a thread, on a loopback port chosen by the OS (tests,
    benchmarks). ``url`` is its address once started; ``stop()`` shuts it down gracefully.

    Example:
        >>> with BackgroundServer(app) as srv:
        ...     urllib.request.urlopen(srv.url + "/v1/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 graceful_s: float | None = 30.0) -> None:
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(_config(app, log_level, graceful_s))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="kdedge-http", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        """Shut down as on SIGTERM, and wait for it (at most ``timeout`` seconds)."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
