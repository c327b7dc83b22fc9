"""What a bundle holds, for ``kdedge inspect BUNDLE`` (table) and ``--json``.

Reads only the bundle (numpy + jsonschema, no torch, no onnxruntime). The manifest must be
valid (else :class:`~kdedge.bundle.manifest.BundleError`); file checks are *reported*: each
file's size and whether its sha256 matches, and ``intact`` for the whole bundle, so that a
damaged bundle can still be looked at. ``status`` sums it up for programs: ``ok``,
``damaged`` (a file is missing, modified or not a regular file) or ``unverified`` (the manifest
records a failed verification); ``problems`` gives one line per problem. ``kdedge inspect``
exits non-zero unless the status is ``ok``, so that ``kdedge inspect B && deploy B`` never
ships a damaged bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdedge.bundle.manifest import read_manifest
from kdedge.bundle.validate import check_entry

STATUSES = ("ok", "damaged", "unverified")


def _file_row(root: Path, graph: str, target: str, f: dict[str, Any]) -> dict[str, Any]:
    """One file's row; only regular files (and package directories) are measured and hashed,
    sizes before digests, so a FIFO or a device in a file's place cannot hang the inspection."""
    import os
    import stat

    from kdedge.bundle.files import path_bytes

    full = root / f["path"]
    problem = check_entry(root, f, f"{graph} ({target})" if target != "-" else graph)
    try:
        inside = root.resolve() in full.resolve().parents
        mode = os.stat(full).st_mode
        exists = True
    except (OSError, RuntimeError):  # missing, or a symbolic-link loop
        inside, mode, exists = False, 0, full.is_symlink()
    size = None
    if inside and (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # never measure what lies outside the bundle
        try:
            size = path_bytes(full)
        except (OSError, ValueError):
            size = None
    return {"graph": graph, "target": target, "path": f["path"], "precision": f.get("precision"),
            "bytes": size, "bytes_recorded": f["bytes"], "exists": exists, "sha256_ok": problem is None,
            "problem": problem}


def _verify_report(root: Path, manifest: dict[str, Any]) -> Any:
    """The export's verification report, read strictly; None when absent or unreadable (its
    checksum row says whether it is intact)."""
    from kdedge.io import JSONError, read_json_strict

    entry = manifest["reports"].get("verify")
    if entry is None:
        return None
    try:
        return read_json_strict(root / entry["path"])
    except (JSONError, OSError):
        return None


def inspect_bundle(path: str | Path) -> dict[str, Any]:
    """Summary of a bundle: manifest, per-file sizes and checksum results, verification.

    Returns:
        ``{"path", "status", "problems", "intact", "manifest", "files": [{graph, target, path,
        precision, bytes, bytes_recorded, exists, sha256_ok, problem}], "total_bytes", "stages":
        [...], "prefixes": [...], "verification": {...}, "verify_report": {...} | None,
        "profiles": [names]}``; each stage row has name, inputs (bindings), outputs, members,
        members_total, macs, params, accuracy and its file per target.

    Raises:
        BundleError: the path is not a bundle or its manifest is invalid or of a newer schema.

    Example:
        >>> info = inspect_bundle("model.kdedge"); info["status"], info["stages"][0]["accuracy"]
    """
    root = Path(path)
    manifest = read_manifest(root)
    files = []
    rows: dict[str, list[dict[str, Any]]] = {"stages": [], "prefixes": []}
    for kind in ("stages", "prefixes"):
        for s in manifest[kind]:
            frows = [_file_row(root, s["name"], t, f) for t, f in s["files"].items()]
            files.extend(frows)
            rows[kind].append({
                "name": s["name"], "inputs": [i["binding"] for i in s["inputs"]],
                "outputs": [o["name"] for o in s["outputs"]], "logits": s["logits"], "members": s["members"],
                "members_total": s["members_total"], "macs": s["macs"], "params": s["params"],
                "accuracy": s["accuracy"], "files": {r["target"]: r for r in frows},
            })
    for name, f in manifest["reports"].items():
        files.append(_file_row(root, f"report:{name}", "-", f))
    profiles = sorted(p.name for p in (root / "profiles").glob("*.json")) if (root / "profiles").is_dir() else []
    problems = [f["problem"] for f in files if f["problem"]]
    intact = not problems
    if not manifest["verification"]["passed"]:
        problems.append(f"bundle {root}: the manifest records a failed verification against torch; re-export it")
    status = "damaged" if not intact else ("unverified" if problems else "ok")
    return {
        "path": str(root),
        "status": status,
        "problems": problems,
        "intact": intact,
        "format": manifest["format"],
        "schema_version": manifest["schema_version"],
        "family": manifest["family"],
        "classes": manifest["classes"],
        "input": manifest["input"],
        "preprocessing": manifest["preprocessing"],
        "combine": manifest["combine"],
        "targets": manifest["targets"],
        "files": files,
        "total_bytes": sum(f["bytes"] or 0 for f in files),
        "stages": rows["stages"],
        "prefixes": rows["prefixes"],
        "evaluation": manifest["evaluation"],
        "verification": manifest["verification"],
        "quantization": manifest["quantization"],
        "provenance": {k: v for k, v in manifest["provenance"].items() if k != "config"},
        "verify_report": _verify_report(root, manifest),
        "profiles": profiles,
        "manifest": manifest,
    }


def format_inspect(info: dict[str, Any]) -> str:
    """The summary as plain text (what ``kdedge inspect`` prints without ``--json``)."""
    rules = info["combine"]["supported"]
    v = info["verification"]
    lines = [
        f"bundle {info['path']}  family {info['family']}  schema {info['schema_version']}  "
        f"targets {', '.join(info['targets'])}  {'intact' if info['intact'] else 'DAMAGED (file check failed)'}",
        f"input {info['input']['shape']} {info['input']['dtype']} {info['input']['layout']}, "
        f"{len(info['classes'])} classes, combine {info['combine']['default']} (supports {', '.join(rules)})",
        f"verification: {'passed' if v['passed'] else 'FAILED'} on {v['n']} images, max abs error "
        f"{v['max_abs_error']:.3g}, min top-1 agreement {100 * v['min_top1']:.2f}%",
    ]
    head = f"{'graph':<9} {'members':>7} {'MMACs':>9} {'params':>9} " + " ".join(f"{'acc ' + r:>16}" for r in rules)
    head += f"  {'file':<22} {'prec':<5} {'KiB':>8}  ok"
    lines.append(head)
    for kind in ("stages", "prefixes"):
        for s in info[kind]:
            for t, f in s["files"].items():
                lines.append(
                    f"{s['name']:<9} {s['members_total']:>7} {s['macs'] / 1e6:>9.3f} {s['params']:>9} "
                    + " ".join(f"{100 * s['accuracy'][r]:>15.2f}%" for r in rules)
                    + f"  {f['path']:<22} {f['precision'] or '':<5} {(f['bytes'] or 0) / 1024:>8.1f}  "
                    + ("yes" if f["sha256_ok"] else "NO"))
    lines.append(f"total {info['total_bytes'] / 1024:.1f} KiB; profiles: {', '.join(info['profiles']) or 'none'}")
    q = info.get("quantization")
    if q:
        lines.append(f"INT8 ({q['format']}, {q['n_calibration']} calibration images, max drop {q['max_drop']:g} points)"
                     f"; kept FP32: {', '.join(q['fp32_graphs']) or 'none'}")
    return "\n".join(lines)
