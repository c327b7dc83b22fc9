"""Merge a new measurement into the profile already stored under the same name.

``kdedge profile --batch 64`` after ``kdedge profile --batch 1`` must leave a profile with both
batch sizes: a policy at batch 1 still needs batch 1's numbers. Two measurements can share a
profile when they agree on its key (:data:`kdedge.bundle.profile.spec.KEY_FIELDS`: device, setting,
target, run key, threads, bundle fingerprint, session options): then the new batches are added,
re-measured batches replaced and the others kept. A stored profile with another key is replaced,
and the message says why; for another fingerprint, that the bundle changed (stale), so the
batches it held must be measured again.

Energy follows the entries it belongs to: kept batches keep their ``energy_mj`` when they were
measured with the same meter as the new batches (or when the new run had no meter); when the
meters differ, the kept batches' energy is dropped (one ``energy`` section names one meter) and
the message says so. Their latency is kept either way.
"""

from __future__ import annotations

import copy
from typing import Any

from kdedge.bundle.profile.spec import KEY_FIELDS

__all__ = ["merge_profiles", "profile_key"]


def profile_key(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of :data:`KEY_FIELDS` of a profile dict (``run_key`` as
    :attr:`LatencyProfile.run_key` reads it, ``options`` ``{}`` when absent)."""
    run_key = data.get("run_key")
    if run_key is None:
        run_key = "" if data.get("target") == "onnx" else f"{data.get('target')}-?"
    return {"device": data.get("device"), "setting": data.get("setting"), "target": data.get("target"),
            "run_key": run_key, "threads": data.get("threads"),
            "fingerprint": (data.get("bundle") or {}).get("fingerprint"), "options": data.get("options") or {}}


def _measured(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per batch: when and with how many runs it was measured (profiles written before merging
    existed record this once, at the top level)."""
    if isinstance(data.get("measured"), dict):
        return copy.deepcopy(data["measured"])
    rec = {"runs": data.get("runs"), "warmup": data.get("warmup"), "created": data.get("created")}
    rec = {k: v for k, v in rec.items() if v is not None}
    return {str(b): dict(rec) for b in data["batches"]} if {"runs", "warmup"} <= set(rec) else {}


def _batches(bs: Any) -> str:
    return ", ".join(str(b) for b in sorted(bs))


def merge_profiles(old: dict[str, Any] | None, new: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    """The profile to store when ``new`` is measured and ``old`` is stored at ``where``.

    Returns:
        (profile dict, message or None): the message says what happened to ``old`` (batches
        added / re-measured / kept, or why it was replaced).
    """
    if old is None:
        return new, None
    ko, kn = profile_key(old), profile_key(new)
    diff = [f for f in KEY_FIELDS if ko[f] != kn[f]]
    if "fingerprint" in diff:
        return new, (f"replaced the stale profile {where}: it was measured on other stage files (the bundle changed "
                     f"since); its batches {_batches(old['batches'])} are gone: measure them again with --batch "
                     f"{','.join(str(b) for b in sorted(old['batches']))}")
    if diff:
        f = diff[0]
        return new, (f"replaced {where}: it was measured with {f} {ko[f]!r}, this run has {kn[f]!r}; its batches "
                     f"{_batches(old['batches'])} are gone")
    if set(old["graphs"]) != set(new["graphs"]):
        return new, (f"replaced {where}: it measured other graphs ({_batches(old['graphs'])}) than this run "
                     f"({_batches(new['graphs'])})")
    new_b = {str(b) for b in new["batches"]}
    kept = sorted({str(b) for b in old["batches"]} - new_b, key=int)
    again = sorted({str(b) for b in old["batches"]} & new_b, key=int)
    added = sorted(new_b - {str(b) for b in old["batches"]}, key=int)
    merged = copy.deepcopy(new)
    energy, keep_energy, note = _merge_energy(old, new, kept)
    for g, per in merged["graphs"].items():
        for b in kept:
            entry = copy.deepcopy(old["graphs"][g][b])
            if not keep_energy:
                entry.pop("energy_mj", None)
            per[b] = entry
        merged["graphs"][g] = {b: per[b] for b in sorted(per, key=int)}
    merged["batches"] = sorted(int(b) for b in (*kept, *new_b))
    old_measured = _measured(old)
    merged["measured"] = {**{b: old_measured[b] for b in kept if b in old_measured}, **_measured(new)}
    merged["measured"] = {b: merged["measured"][b] for b in sorted(merged["measured"], key=int)}
    if energy is None:
        merged.pop("energy", None)
    else:
        merged["energy"] = energy
    parts = [f"added batch {_batches(added)}" if added else "",
             f"re-measured batch {_batches(again)}" if again else "",
             f"kept batch {_batches(kept)}" if kept else ""]
    return merged, f"{where}: " + ", ".join(p for p in parts if p) + note


def _merge_energy(old: dict[str, Any], new: dict[str, Any], kept: list[str]) -> tuple[dict[str, Any] | None, bool, str]:
    """(the merged ``energy`` section, whether the kept batches keep their energy_mj, a note for
    the message)."""
    eo, en = old.get("energy"), new.get("energy")
    old_has = bool(kept) and isinstance(eo, dict) and eo.get("measured") is True
    new_has = isinstance(en, dict) and en.get("measured") is True
    kept_clamped = [c for c in (eo or {}).get("clamped", []) if c.rsplit("@", 1)[-1] in kept]
    if new_has and old_has and eo.get("source") != en.get("source"):
        return en, False, (f"; the energy of batch {_batches(kept)} (meter {eo.get('source')}) was dropped: this "
                           f"run measured with meter {en.get('source')}, and a profile holds one meter's energy")
    if new_has:
        return {**en, "clamped": (kept_clamped if old_has else []) + list(en.get("clamped", []))}, old_has, ""
    if old_has:
        note = "" if en is None else f"; energy kept from meter {eo.get('source')} for batch {_batches(kept)} only"
        return {**eo, "clamped": kept_clamped}, True, note
    if en is not None:
        return en, False, ""
    return (eo if isinstance(eo, dict) and eo.get("measured") is not True else None), False, ""
