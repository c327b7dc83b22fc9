"""Energy per stage: what the energy policy of ``kdedge run --energy-mj`` budgets with.

A power meter cannot resolve one sub-millisecond stage (a Jetson's INA3221 is sampled every
~10 ms), so energy is measured over *windows*: one meter window around ``runs`` back-to-back
runs of the same graphs, and the energy per inference is the window's energy divided by
``runs``. Only a mean per inference is observable this way, so a profile's ``energy_mj`` holds
``mean`` and ``n`` (the runs in the window) and no percentiles.

* ``prefixK`` (a fused prefix graph): a window around ``runs`` runs of that graph alone.
* ``chain``: a window around ``runs`` runs of every stage one by one.
* ``stageK``: a window around ``runs`` runs of stages ``0..K`` one by one gives the cumulative
  energy ``E(0..K)``; stage K's energy is ``E(0..K) - E(0..K-1)``. Meter noise can make a
  difference slightly negative; it is clamped at 0 and the clamp is recorded in the profile's
  ``energy.clamped`` list, so a reader sees it.

The ``none`` meter (no sensor) records ``{"measured": false, "note": ...}`` and no
``energy_mj`` entries: energy is "not measured", never zero.

Example:
    >>> from kdedge.profile.meters import create_meter
    >>> with Runner("hne.kdedge") as r:
    ...     info, graphs = measure_energy(r, x, runs=200, meter=create_meter("auto"))
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

__all__ = ["measure_energy", "energy_summary"]


def _window(meter: Any, runs: int, once: Callable[[], None], what: str) -> Any:
    meter.start()
    try:
        for _ in range(runs):
            once()
    except BaseException:
        meter.stop()
        raise
    return _checked(meter.stop(), what)


def _checked(reading: Any, what: str) -> Any:
    """Refuse a window whose energy is NaN, infinite or negative: a broken sensor or a counter
    that wrapped unnoticed. Stored, it would switch the energy policy off or make it lie; no
    clamping can repair a window (only a *difference* of windows may dip below 0 by noise)."""
    j = reading.joules
    if j is not None and not (isinstance(j, (int, float)) and math.isfinite(j) and j >= 0):
        from kdedge.profile.meters.base import PowerError

        raise PowerError(f"power meter {reading.source} read {j!r} J over the window of {what}; a window's energy "
                         "must be a finite number >= 0: check the meter (kdedge doctor, docs/power.md)")
    return reading


def energy_summary(reading: Any, runs: int) -> dict[str, Any]:
    """``{"mean": mJ per inference, "n": runs}`` of a measured reading over ``runs`` inferences."""
    return {"mean": float(reading.joules) * 1e3 / runs, "n": int(runs)}


def measure_energy(runner: Any, x: np.ndarray, runs: int, meter: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Measure the energy per inference of every stage, fused prefix and the chain at ``x``'s batch.

    Args:
        runner: an open :class:`kdedge.runtime.Runner` (no profile needed).
        x: the input batch.
        runs: runs per window.
        meter: a power meter (:mod:`kdedge.profile.meters`).

    Returns:
        (info, graphs): ``info`` describes the measurement (``measured``, ``source``,
        ``period_s``, ``note``, ``clamped``); ``graphs`` maps graph name to its ``energy_mj``
        summary (empty when the meter measures nothing).
    """
    from kdedge.bundle.profile.spec import CHAIN
    from kdedge.runtime.policies import Fixed

    if runs < 1:
        raise ValueError(f"energy windows need runs >= 1, got {runs}")
    k_stages = runner.num_stages
    cumulative: list[Any] = []
    for k in range(1, k_stages + 1):
        pol = Fixed(k, fused=False)
        cumulative.append(_window(meter, runs, lambda pol=pol: runner.run(x, pol), f"stages 0..{k - 1}"))
    prefix_readings = []
    for j in range(runner.num_prefixes):
        pol = Fixed(j + 1, fused=True)
        prefix_readings.append(_window(meter, runs, lambda pol=pol: runner.run(x, pol), f"prefix{j}"))
    first = cumulative[0]
    periods = [r.period_s for r in (*cumulative, *prefix_readings) if r.period_s is not None]
    info: dict[str, Any] = {
        "measured": bool(first.measured),
        "source": first.source,
        "period_s": float(np.mean(periods)) if periods else None,
        "note": first.note,
        "runs_per_window": int(runs),
        "clamped": [],
    }
    if not first.measured:
        return info, {}
    graphs: dict[str, dict[str, Any]] = {}
    prev = 0.0
    for k, reading in enumerate(cumulative):
        total = float(reading.joules) * 1e3 / runs
        diff = total - prev
        if diff < 0:
            info["clamped"].append(f"stage{k}")
            diff = 0.0
        graphs[f"stage{k}"] = {"mean": diff, "n": int(runs)}
        prev = total
    graphs[CHAIN] = energy_summary(cumulative[-1], runs)
    for j, reading in enumerate(prefix_readings):
        graphs[f"prefix{j}"] = energy_summary(reading, runs)
    return info, graphs
