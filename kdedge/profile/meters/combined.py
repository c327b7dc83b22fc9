"""Several meters over the same window, summed: e.g. GPU (NVML) + CPU package (RAPL)."""

from __future__ import annotations

import math
from typing import Sequence

from kdedge.profile.meters.base import EnergyReading, Meter, PowerError


class CombinedMeter(Meter):
    """Runs several meters over one window and adds their energies.

    Rails are prefixed with the meter's name (``nvml:gpu0``, ``rapl:package-0``). The meters
    must measure disjoint parts of the machine; adding a board-input rail to anything else would
    count twice.

    Args:
        meters: the meters to combine (at least two).
    """

    def __init__(self, meters: Sequence[Meter]) -> None:
        if len(meters) < 2:
            raise PowerError("CombinedMeter needs at least two meters")
        self.meters = list(meters)
        self.name = "+".join(m.name for m in self.meters)  # type: ignore[misc]

    def probe(self) -> str:
        return "; ".join(f"{m.name}: {m.probe()}" for m in self.meters)

    def start(self) -> None:
        started: list[Meter] = []
        try:
            for m in self.meters:
                m.start()
                started.append(m)
        except BaseException:
            for m in started:
                try:
                    m.stop()
                except Exception:
                    pass
            raise

    def stop(self) -> EnergyReading:
        # Stop in reverse order so the windows nest: the first meter's window covers the others.
        readings = [m.stop() for m in reversed(self.meters)][::-1]
        measured = [r for r in readings if r.joules is not None]
        joules = sum(r.joules for r in measured) if measured else None  # type: ignore[misc]
        seconds = readings[0].seconds
        rails = {f"{r.source}:{k}": v for r in readings for k, v in r.rails.items()}
        return EnergyReading(
            joules=joules,
            mean_watts=None if joules is None else (joules / seconds if seconds > 0 else math.nan),
            seconds=seconds,
            samples=sum(r.samples for r in readings),
            period_s=None,
            source=self.name,
            rails=rails,
            note="; ".join(f"{r.source}: {r.note}" for r in readings),
        )

    def close(self) -> None:
        for m in self.meters:
            m.close()
