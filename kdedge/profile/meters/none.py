"""The ``none`` meter: energy is not measured, and every reading says so.

A reading from it has ``joules = mean_watts = None`` (never a zero that could pass for a
measurement), ``measured == False`` and a note stating that energy was not measured and why.
"""

from __future__ import annotations

from kdedge.profile.meters.base import EnergyReading, Meter, PowerError, clock

NOT_MEASURED = "energy is not measured on this machine"


class NoneMeter(Meter):
    """Times the window but measures no energy.

    Args:
        reason: why no meter is used (``auto_meter`` passes what each real meter reported).

    Example:
        >>> with NoneMeter("no power sensor") as meter:
        ...     run_stage()
        >>> meter.reading.joules is None, meter.reading.note
        (True, 'energy is not measured on this machine: no power sensor')
    """

    name = "none"

    def __init__(self, reason: str = "no power meter was selected") -> None:
        self.reason = reason
        self._t0: float | None = None

    @property
    def statement(self) -> str:
        return f"{NOT_MEASURED}: {self.reason}"

    def probe(self) -> str:
        return self.statement

    def start(self) -> None:
        if self._t0 is not None:
            raise PowerError("none meter already started; call stop() before start()")
        self._t0 = clock()

    def stop(self) -> EnergyReading:
        t1 = clock()
        if self._t0 is None:
            raise PowerError("none meter was not started; call start() first")
        t0, self._t0 = self._t0, None
        return EnergyReading(
            joules=None,
            mean_watts=None,
            seconds=t1 - t0,
            samples=0,
            period_s=None,
            source=self.name,
            rails={},
            note=self.statement,
        )
