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

from kdedge.profile.meters import (
    AUTO_ORDER,
    DEFAULT_PERIOD_S,
    INPUT_RAILS,
    METERS,
    CombinedMeter,
    CounterMeter,
    EnergyReading,
    JetsonSysfsMeter,
    JtopMeter,
    Meter,
    MeterStatus,
    NoneMeter,
    NvmlMeter,
    PollingMeter,
    PowerError,
    PowerPermissionError,
    RaplMeter,
    SamplingMeter,
    StreamMeter,
    TegrastatsMeter,
    auto_meter,
    counter_delta,
    create_meter,
    find_rails,
    integrate,
    meter_report,
)
from kdedge.profile.tegrastats import TegrastatsFormatError, parse_line

__all__ = [
    "AUTO_ORDER",
    "DEFAULT_PERIOD_S",
    "INPUT_RAILS",
    "METERS",
    "CombinedMeter",
    "CounterMeter",
    "EnergyReading",
    "JetsonSysfsMeter",
    "JtopMeter",
    "Meter",
    "MeterStatus",
    "NoneMeter",
    "NvmlMeter",
    "PollingMeter",
    "PowerError",
    "PowerPermissionError",
    "RaplMeter",
    "SamplingMeter",
    "StreamMeter",
    "TegrastatsFormatError",
    "TegrastatsMeter",
    "auto_meter",
    "counter_delta",
    "create_meter",
    "find_rails",
    "integrate",
    "meter_report",
    "parse_line",
]
