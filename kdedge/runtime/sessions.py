"""Old home of the session interface and the onnxruntime session; they live in
:mod:`kdedge.targets.session`, :mod:`kdedge.targets.ort_session` and :mod:`kdedge.targets.threads`
(the watchdog in :mod:`kdedge.runtime.watchdog`). Kept as a re-export for one release."""

from __future__ import annotations

from kdedge.runtime.watchdog import Watchdog
from kdedge.targets.ort_session import OPTIMIZATION_LEVELS, OrtOptions, OrtSession, open_ort_session
from kdedge.targets.session import AbortHandle, BoundCall, Session, StageAborted, numpy_dtype
from kdedge.targets.threads import THREADS_PER_CPU, check_threads, default_threads, max_threads, usable_cpus

__all__ = ["AbortHandle", "BoundCall", "OPTIMIZATION_LEVELS", "OrtOptions", "OrtSession", "Session", "StageAborted",
           "THREADS_PER_CPU", "Watchdog", "check_threads", "default_threads", "max_threads", "numpy_dtype",
           "open_ort_session", "usable_cpus"]
