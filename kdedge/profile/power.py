"""Power and energy measurement: the public entry point.

Everything a profiler or a runner needs is importable from here; the meters themselves live in
:mod:`kdedge.profile.meters` (one module per family). Only the standard library is imported;
``pynvml`` and ``jtop`` are imported by their meters when used.

Example:
    >>> from kdedge.profile.power import auto_meter
    >>> meter = auto_meter(period_s=0.01)
    >>> with meter:
    ...     run_stage()
    >>> r = meter.reading
    >>> r.joules, r.mean_watts, r.seconds, r.samples, r.period_s, r.source, r.rails
    >>> r.measured          # False for the "none" meter, whose joules are None
"""

from __future__ import annotations

from kdedge.profile import meters as _meters
from kdedge.profile.meters import *  # noqa: F403 - the meters' public names, re-exported as they are
from kdedge.profile.tegrastats import TegrastatsFormatError, parse_line

__all__ = [*_meters.__all__, "TegrastatsFormatError", "parse_line"]
