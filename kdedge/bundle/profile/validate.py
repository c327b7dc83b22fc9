"""Check a latency profile before any policy plans with it, like a manifest before a bundle runs.

A profile enters kdedge from a file a user may have edited, copied or damaged (``kdedge run
--profile FILE``, ``BUNDLE/profiles/``) or from a measurement. Either way a policy must never
plan with a statistic that is missing, null, NaN, infinite or negative: the deadline policy's
``latency + margin > left`` is False for NaN, so a NaN latency would silently switch the
deadline off. Checks, in order, each raising :class:`InvalidProfileError` with one line that
names where the profile came from and the first bad field:

1. header: a JSON object of format ``kdedge-profile``, ``version`` a positive integer, not newer
   than this kdedge reads (:class:`NewerProfileError`, so the message says to upgrade);
2. numbers: every latency statistic a finite number > 0, every ``n`` an integer >= 1, every
   energy mean a finite number >= 0 (a stage whose energy difference was clamped at 0 is 0);
3. the JSON schema ``kdedge/schemas/profile.schema.json`` (structure, names, types);
4. rules the schema cannot express: ordered percentiles (min <= median <= p90 <= p95 <= p99 <=
   max, min <= mean <= max), every graph measured at exactly the listed ``batches``, energy
   entries only under a measured ``energy`` section.

:func:`check_coverage` adds the check that needs the bundle: the profile measures every stage
of it and no graph it does not have.

Example:
    >>> validate_profile(json.loads(text), "profiles/x.json")
    InvalidProfileError: profiles/x.json: stage1 batch 1 p99 must be a finite number > 0, got -3
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdedge.bundle.profile.spec import (
    CHAIN,
    FORMAT,
    STATS,
    VERSION,
    ForeignProfileError,
    InvalidProfileError,
    NewerProfileError,
)

__all__ = ["check_coverage", "load_profile_schema", "validate_profile"]

# percentiles must not decrease along this chain; the mean lies between min and max
ORDER = ("min", "median", "p90", "p95", "p99", "max")
# the mean of identical samples can exceed them by a rounding step (sum / n)
_REL_TOL = 1e-9


def validate_profile(data: Any, where: str) -> None:
    """Raise :class:`InvalidProfileError` (or :class:`NewerProfileError`) naming ``where`` and the
    first field that breaks the profile format; return None for a valid profile."""
    _check_header(data, where)
    _check_numbers(data, where)
    _check_schema(data, where)
    _check_rules(data, where)


def check_coverage(data: dict[str, Any], bundle: Any, where: str) -> None:
    """Refuse a profile that is not of this bundle's graphs: one that lacks a stage (a policy
    would fail mid-request) or measures a graph the bundle does not have (it belongs to another
    bundle). Fused prefixes are optional: without them only ``--fused`` fails, with a clear
    message, when it asks for one.

    Raises:
        ForeignProfileError: naming the graphs.
    """
    stages = [e.name for e in bundle.stages]
    known = {*stages, *(p.name for p in bundle.prefixes), CHAIN}
    graphs = set(data["graphs"])
    extra = sorted(graphs - known)
    if extra:
        raise ForeignProfileError(f"{where} measures {', '.join(extra)}, which bundle {bundle.path} does not have "
                                  f"(it has {', '.join(sorted(known - {CHAIN}))}): the profile belongs to another "
                                  f"bundle; run `kdedge profile {bundle.path}`")
    missing = [s for s in stages if s not in graphs]
    if missing:
        raise ForeignProfileError(f"{where} has no measurements of {', '.join(missing)} of bundle {bundle.path}: "
                                  f"it belongs to another bundle or was cut short; run `kdedge profile {bundle.path}`")


@lru_cache(maxsize=1)
def load_profile_schema() -> dict[str, Any]:
    """The profile JSON schema (``kdedge/schemas/profile.schema.json``, package data)."""
    path = Path(__file__).resolve().parents[2] / "schemas" / "profile.schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(load_profile_schema())


def _show(v: Any) -> str:
    """A value as it reads in JSON (``null``, ``NaN``, ``"3"``), cut to a readable length."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_header(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise InvalidProfileError(f"{where} is not a kdedge latency profile (a JSON object), got a "
                                  f"{type(data).__name__}")
    if data.get("format") != FORMAT:
        raise InvalidProfileError(f"{where} is not a kdedge latency profile (format {_show(data.get('format'))}, "
                                  f"expected {FORMAT!r})")
    v = data.get("version")
    if not (isinstance(v, int) and not isinstance(v, bool)) or v < 1:
        raise InvalidProfileError(f"{where}: version must be a positive integer, got {_show(v)}")
    if v > VERSION:
        raise NewerProfileError(f"{where} is a version {v} profile; this kdedge reads up to version {VERSION}; "
                                "upgrade kdedge or profile the bundle again")


def _entries(data: dict[str, Any]) -> Any:
    """(graph, batch key, entry) for every graph/batch entry that is a dict (the schema reports
    the others)."""
    graphs = data.get("graphs")
    if not isinstance(graphs, dict):
        return
    for g, per in graphs.items():
        if not isinstance(per, dict):
            continue
        for b, entry in per.items():
            if isinstance(entry, dict):
                yield g, b, entry


def _check_numbers(data: dict[str, Any], where: str) -> None:
    """Every statistic a finite number in range, with a message a user can act on (the schema's
    own would read ``-3 is less than or equal to the minimum of 0``, and NaN passes JSON Schema's
    range keywords: every comparison with NaN is False)."""
    for g, b, entry in _entries(data):
        lat = entry.get("latency_ms")
        if isinstance(lat, dict):
            for s in STATS:
                if s not in lat:
                    raise InvalidProfileError(f"{where}: {g} batch {b} latency_ms lacks {s}")
                v = lat[s]
                if not (_is_number(v) and math.isfinite(v) and v > 0):
                    raise InvalidProfileError(f"{where}: {g} batch {b} {s} must be a finite number > 0 (ms), "
                                              f"got {_show(v)}")
            if not _is_count(lat.get("n")):
                raise InvalidProfileError(f"{where}: {g} batch {b} latency_ms n must be an integer >= 1, "
                                          f"got {_show(lat.get('n'))}")
        mj = entry.get("energy_mj")
        if isinstance(mj, dict):
            v = mj.get("mean")
            if not (_is_number(v) and math.isfinite(v) and v >= 0):
                raise InvalidProfileError(f"{where}: {g} batch {b} energy_mj mean must be a finite number >= 0 "
                                          f"(mJ), got {_show(v)}")
            if not _is_count(mj.get("n")):
                raise InvalidProfileError(f"{where}: {g} batch {b} energy_mj n must be an integer >= 1, "
                                          f"got {_show(mj.get('n'))}")
    energy = data.get("energy")
    if isinstance(energy, dict) and energy.get("period_s") is not None:
        v = energy["period_s"]
        if not (_is_number(v) and math.isfinite(v) and v > 0):
            raise InvalidProfileError(f"{where}: energy period_s must be null or a finite number > 0 (s), "
                                      f"got {_show(v)}")


def _field(path: Any) -> str:
    """A schema error's location as a user reads it: ``stage1 batch 1 latency_ms`` under
    ``graphs``, dotted elsewhere."""
    parts = [str(p) for p in path]
    if len(parts) >= 2 and parts[0] == "graphs":
        rest = parts[3:]
        head = f"{parts[1]} batch {parts[2]}" if len(parts) >= 3 else parts[1]
        return " ".join([head, *rest])
    return ".".join(parts) or "(top level)"


def _message(e: Any) -> str:
    """The schema error's message; for a bad key (``propertyNames``), what a key must be."""
    if "propertyNames" in e.schema_path:
        names = "a graph name (stageN, prefixN or chain)" if list(e.absolute_path) == ["graphs"] else \
            "a batch size (a positive integer without leading zeros)"
        return f"key {_show(e.instance)} is not {names}"
    return e.message if len(e.message) <= 200 else e.message[:197] + "..."


def _check_schema(data: dict[str, Any], where: str) -> None:
    errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        e = errors[0]
        message = _message(e)
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise InvalidProfileError(f"{where}: {_field(e.absolute_path)}: {message}{more}")


def _check_rules(data: dict[str, Any], where: str) -> None:
    batches = sorted(data["batches"])
    listed = {str(b) for b in batches}
    for g, per in data["graphs"].items():
        have = sorted(per, key=int)
        if set(have) != listed:
            raise InvalidProfileError(f"{where}: {g} is measured at batches {', '.join(have)} but the profile lists "
                                      f"batches {', '.join(map(str, batches))}; every graph is measured at every "
                                      "listed batch")
        for b in have:
            _check_order(per[b]["latency_ms"], f"{where}: {g} batch {b}")
    unknown = sorted(set(data.get("measured", {})) - listed, key=int)
    if unknown:
        raise InvalidProfileError(f"{where}: measured names batches {', '.join(unknown)} that the profile does not "
                                  "list")
    _check_energy(data, where)


def _check_order(lat: dict[str, Any], where: str) -> None:
    for lo, hi in zip(ORDER, ORDER[1:]):
        if lat[lo] > lat[hi] * (1 + _REL_TOL):
            raise InvalidProfileError(f"{where} latency_ms is out of order: {lo} {lat[lo]!r} > {hi} {lat[hi]!r} "
                                      "(percentiles need min <= median <= p90 <= p95 <= p99 <= max)")
    if not lat["min"] * (1 - _REL_TOL) <= lat["mean"] <= lat["max"] * (1 + _REL_TOL):
        raise InvalidProfileError(f"{where} latency_ms mean {lat['mean']!r} is outside [min {lat['min']!r}, "
                                  f"max {lat['max']!r}]")


def _check_energy(data: dict[str, Any], where: str) -> None:
    """Energy entries exist exactly when a meter measured: "not measured" is never a zero."""
    with_energy = [f"{g}@{b}" for g, b, entry in _entries(data) if "energy_mj" in entry]
    energy = data.get("energy")
    measured = isinstance(energy, dict) and energy.get("measured") is True
    if with_energy and not measured:
        raise InvalidProfileError(f"{where}: {with_energy[0]} has energy_mj but the profile's energy section "
                                  f"{'is missing' if energy is None else 'says measured: false'}")
    if measured and not with_energy:
        raise InvalidProfileError(f"{where}: energy says measured: true but no graph has energy_mj")
    have = set(with_energy)
    for c in (energy or {}).get("clamped", []):
        if c not in have:
            raise InvalidProfileError(f"{where}: energy clamped names {c}, which has no energy_mj")
