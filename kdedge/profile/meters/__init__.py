"""Power meters by name, and the choice of the best one this machine has.

=================  ===================================================  ==========
name               what it reads                                        kind
=================  ===================================================  ==========
``jetson-sysfs``   Jetson INA3221 rails from sysfs (JetPack 4-7)        sampling
``tegrastats``     Jetson rails from a ``tegrastats`` subprocess        sampling
``jtop``           Jetson rails from the jetson-stats service           sampling
``nvml``           NVIDIA GPU total-energy counter (``pynvml``)         counter
``rapl``           x86 RAPL / ``amd_energy`` CPU energy counters        counter
``none``           nothing; readings say energy is not measured         —
=================  ===================================================  ==========

Example:
    >>> meter = auto_meter()            # or create_meter("rapl")
    >>> with meter:
    ...     run_stage()
    >>> print(meter.reading)
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

from kdedge.profile.meters.base import (
    DEFAULT_PERIOD_S,
    INPUT_RAILS,
    EnergyReading,
    Meter,
    MeterStatus,
    PollingMeter,
    PowerError,
    PowerPermissionError,
    SamplingMeter,
    StreamMeter,
    integrate,
)
from kdedge.profile.meters.counters import CounterMeter, counter_delta
from kdedge.profile.meters.combined import CombinedMeter
from kdedge.profile.meters.jetson import JetsonSysfsMeter, JtopMeter, TegrastatsMeter, find_rails
from kdedge.profile.meters.none import NoneMeter
from kdedge.profile.meters.nvml import NvmlMeter
from kdedge.profile.meters.rapl import RaplMeter
from kdedge.registry import suggest

METERS: dict[str, type[Meter]] = {
    "jetson-sysfs": JetsonSysfsMeter,
    "tegrastats": TegrastatsMeter,
    "jtop": JtopMeter,
    "nvml": NvmlMeter,
    "rapl": RaplMeter,
    "none": NoneMeter,
}

#: The order ``auto_meter`` tries meters in. A Jetson's board rails win over everything else;
#: elsewhere the GPU and CPU counters are combined when both exist.
AUTO_ORDER = ("jetson-sysfs", "tegrastats", "jtop", "nvml", "rapl")
_COUNTERS = ("nvml", "rapl")

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
    "TegrastatsMeter",
    "auto_meter",
    "counter_delta",
    "create_meter",
    "find_rails",
    "integrate",
    "meter_report",
]


def _kwargs_for(cls: type[Meter], period_s: float | None, options: Mapping[str, Mapping[str, Any]] | None) -> dict:
    kwargs = dict((options or {}).get(cls.name, {}))
    if period_s is not None and "period_s" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("period_s", period_s)
    return kwargs


def create_meter(name: str, **kwargs: Any) -> Meter:
    """The meter called ``name`` (see :data:`METERS`), built with ``kwargs``; ``"auto"`` calls
    :func:`auto_meter` with ``kwargs``.

    Raises:
        PowerError: unknown name (the message lists the known ones), or the meter does not work
            on this machine (the message says why).
    """
    if name == "auto":
        return auto_meter(**kwargs)
    if name not in METERS:
        hint = suggest(name, METERS)
        hint = f" ({hint})" if hint.startswith("did") else ""
        raise PowerError(f"unknown power meter {name!r}{hint}; known: auto, {', '.join(METERS)}")
    return METERS[name](**kwargs)


def _try(cls: type[Meter], kwargs: dict) -> tuple[Meter | None, str]:
    meter: Meter | None = None
    try:
        meter = cls(**kwargs)
        meter.probe()
        return meter, ""
    except PowerError as err:
        if meter is not None:
            meter.close()
        return None, str(err)


def auto_meter(
    period_s: float | None = None,
    order: Sequence[str] = AUTO_ORDER,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Meter:
    """The best meter this machine has; the ``none`` meter (with every reason) if it has none.

    Jetson meters are tried first and the first that works is returned; otherwise NVML and RAPL
    are combined when both work (GPU + CPU package), or whichever works alone.

    Args:
        period_s: sampling period for sampling meters (their default otherwise).
        order: meter names to try, in order.
        options: constructor arguments per meter name, e.g. ``{"rapl": {"powercap_root": ...}}``.
    """
    reasons: list[str] = []
    counters: list[Meter] = []
    for name in order:
        if name not in METERS or name == "none":
            raise PowerError(f"auto_meter: {name!r} is not a meter to try; known: {', '.join(AUTO_ORDER)}")
        cls = METERS[name]
        meter, reason = _try(cls, _kwargs_for(cls, period_s, options))
        if meter is None:
            reasons.append(f"{name}: {reason}")
        elif name in _COUNTERS:
            counters.append(meter)
        else:
            for c in counters:
                c.close()
            return meter
    if len(counters) > 1:
        return CombinedMeter(counters)
    if counters:
        return counters[0]
    return NoneMeter("no power meter works here (" + "; ".join(reasons) + ")")


def meter_report(
    period_s: float | None = None, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[MeterStatus]:
    """Whether each meter works on this machine and why not (for ``kdedge doctor``)."""
    out = []
    for name in AUTO_ORDER:
        cls = METERS[name]
        out.append(cls.available(**_kwargs_for(cls, period_s, options)))
    return out
