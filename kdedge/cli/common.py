"""What every command shares: one-line errors, JSON output, the rich consoles."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console

out = Console()                      # results (tables); --json output goes to plain stdout
err = Console(stderr=True)           # progress and errors

F = TypeVar("F", bound=Callable[..., Any])

# Exceptions that mean "bad input or unusable environment": one line, exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
                                                IsADirectoryError, ImportError, KeyError, OSError)


class NotYetAvailable(RuntimeError):
    """A command whose capability is not built yet."""


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def one_line(e: BaseException) -> str:
    text = str(e).strip() or e.__class__.__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    if isinstance(e, ImportError) and getattr(e, "name", None):
        text = f"{text} (install the extra that provides it, e.g. pip install 'kdedge[train]')"
    first, *rest = text.splitlines()
    return first if not rest else first + " (" + "; ".join(r.strip() for r in rest if r.strip())[:500] + ")"


def handle_errors(fn: F) -> F:
    """Run a command; turn expected failures into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("KDEDGE_DEBUG"):  # developers: full tracebacks
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except NotYetAvailable as e:
            fail(str(e), code=3)
        except KeyboardInterrupt:
            again = ("training resumes with --resume" if fn.__module__.endswith(".train") else
                     "nothing half-written is left; rerun the command")
            fail(f"interrupted; files already written are intact ({again})", code=130)
        except FloatingPointError as e:
            fail(one_line(e), code=1)
        except USER_ERRORS as e:
            summary = getattr(e, "summary", None)
            if summary and str(e) != summary:  # e.g. a failed verification: its table, then one line
                sys.stderr.write(str(e).replace(summary, "", 1).strip("\n") + "\n")
                fail(summary, code=2)
            fail(one_line(e), code=2)
        except RecursionError:
            fail("input nested too deeply to read (a damaged or hostile file?)", code=2)
        except MemoryError:
            fail("out of memory; an input claims more data than this machine holds", code=2)
        except Exception as e:  # a bug: still one line, and the way to the traceback
            fail(f"internal error ({type(e).__name__}: {one_line(e)}); rerun with KDEDGE_DEBUG=1 for the "
                 "traceback and report it", code=1)

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Strict JSON on stdout: a non-finite number is ``null``, never ``NaN``."""
    from kdedge.io import dumps_strict

    sys.stdout.write(dumps_strict(obj, default=str) + "\n")
    sys.stdout.flush()


REALTIME_HELP = {
    "realtime": "Real-time execution: SCHED_FIFO for the request thread and onnxruntime's threads, memory "
                "locked, gc kept out of requests (needs root or CAP_SYS_NICE; refused with what to grant "
                "otherwise). Part of the profile's key.",
    "rt_priority": "With --realtime: the real-time priority, 1..98 (default 50).",
    "rt_policy": "With --realtime: fifo (SCHED_FIFO, the default) or rr (SCHED_RR).",
    "cpus": "With --realtime: the CPUs the request threads run on, e.g. 0,1 or 1-3.",
    "mlock": "With --realtime: lock the process's memory (mlockall; the default).",
    "cpu_latency": "With --realtime: keep idle CPUs able to wake within US microseconds while it runs "
                   "(/dev/cpu_dma_latency, root only; 0: they poll, which costs idle power); default off.",
}

# The real-time options of ``run``, ``profile`` and ``serve``, defined once. A command declares
# them as ``realtime: RealtimeOpt = False, rt_priority: RtPriorityOpt = None, rt_policy:
# RtPolicyOpt = None, cpus: CpusOpt = None, mlock: MlockOpt = None, cpu_latency: CpuLatencyOpt
# = None`` and passes them to :func:`realtime_options`, which fills in the defaults; None means
# "not given", so that an option given without ``--realtime`` is refused rather than ignored.
RealtimeOpt = Annotated[bool, typer.Option("--realtime", help=REALTIME_HELP["realtime"])]
RtPriorityOpt = Annotated[Optional[int], typer.Option("--rt-priority", show_default=False,
                                                      help=REALTIME_HELP["rt_priority"])]
RtPolicyOpt = Annotated[Optional[str], typer.Option("--rt-policy", show_default=False,
                                                    help=REALTIME_HELP["rt_policy"])]
CpusOpt = Annotated[Optional[str], typer.Option("--cpus", help=REALTIME_HELP["cpus"])]
MlockOpt = Annotated[Optional[bool], typer.Option("--mlock/--no-mlock", show_default=False,
                                                  help=REALTIME_HELP["mlock"])]
CpuLatencyOpt = Annotated[Optional[str], typer.Option("--cpu-latency", metavar="US|off",
                                                      help=REALTIME_HELP["cpu_latency"])]


def realtime_options(realtime: bool, priority: int | None, policy: str | None, cpus: str | None,
                     mlock: bool | None, cpu_latency: str | None = None) -> Any:
    """The :class:`~kdedge.runtime.realtime.Realtime` that ``--realtime --rt-priority --rt-policy
    --cpus --mlock/--no-mlock --cpu-latency`` ask for, or None without ``--realtime`` (None for
    an option: not given)."""
    from kdedge.runtime.realtime import Realtime, parse_cpu_latency, parse_cpus

    if not realtime:
        given = [flag for flag, value in (("--rt-priority", priority), ("--rt-policy", policy), ("--cpus", cpus),
                                          ("--mlock/--no-mlock", mlock), ("--cpu-latency", cpu_latency))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --realtime")
        return None
    kwargs: dict[str, Any] = {}
    if priority is not None:
        kwargs["priority"] = priority
    if policy is not None:
        kwargs["policy"] = policy
    if mlock is not None:
        kwargs["lock_memory"] = mlock
    return Realtime(cpus=parse_cpus(cpus) if cpus is not None else None,
                    cpu_latency_us=None if cpu_latency is None else parse_cpu_latency(cpu_latency), **kwargs)
