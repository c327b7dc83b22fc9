"""Checking a manifest: format and schema version, the JSON schema, and the rules a schema cannot
express (wiring, shapes, preprocessing, paths); checking every listed file's size and sha256.

Every failure is a :class:`~kdedge.bundle.errors.BundleError` with one line naming the bundle.
"""

from __future__ import annotations

import json
import math
import os
import stat
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from kdedge.bundle.errors import BundleError, BundleVersionError, ChecksumError
from kdedge.bundle.files import file_kind, path_bytes, sha256_path
from kdedge.bundle.names import (
    FORMAT,
    INPUT,
    LOGITS_DTYPES,
    MAX_RANK,
    MAX_SAMPLE_ELEMENTS,
    SCHEMA_INTRODUCED_IN,
    SCHEMA_VERSION,
    SHARED_PATHS_SINCE,
    output_tensor_name,
    tensor_name,
)

__all__ = ["check_entry", "check_version", "load_schema", "validate_manifest", "verify_files"]


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The manifest JSON schema (``kdedge/schemas/manifest.schema.json``)."""
    path = Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json"
    return json.loads(path.read_text())


def _kdedge_version() -> str:
    try:
        from kdedge import __version__

        return __version__
    except Exception:  # pragma: no cover - a broken install still opens bundles
        return "unknown"


def check_version(manifest: dict[str, Any], where: str = "bundle") -> int:
    """Check ``format`` and ``schema_version`` before anything else; return the version."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{where} is not a kdedge bundle manifest (format {got!r}, expected {FORMAT!r})")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        need = SCHEMA_INTRODUCED_IN.get(version) or manifest.get("kdedge_version") or "a newer release"
        raise BundleVersionError(
            f"{where} uses manifest schema version {version}, this kdedge {_kdedge_version()} reads up to "
            f"{SCHEMA_VERSION}; upgrade kdedge to {need} or later (pip install -U 'kdedge>={need}')")
    return version


def _check_wiring(manifest: dict[str, Any]) -> None:
    """Rules the JSON schema cannot express; raise BundleError naming the first violation."""
    supported = manifest["combine"]["supported"]
    if manifest["combine"]["default"] not in supported:
        raise BundleError(f"combine.default {manifest['combine']['default']!r} is not in combine.supported {supported}")
    if len(set(supported)) != len(supported):
        raise BundleError(f"combine.supported lists a rule twice: {supported}")
    targets = manifest["targets"]
    in_shape = manifest["input"]["shape"]
    if len(manifest["preprocessing"]["mean"]) != in_shape[1] or len(manifest["preprocessing"]["std"]) != in_shape[1]:
        raise BundleError(f"preprocessing mean/std need {in_shape[1]} values (input channels)")
    if list(manifest["preprocessing"]["input_size"]) != list(in_shape[2:]):
        raise BundleError(f"preprocessing.input_size {manifest['preprocessing']['input_size']} differs from "
                          f"input.shape {in_shape}")
    produced: dict[str, dict[str, str]] = {}  # stage name -> output name -> tensor name
    total = 0
    for kind in ("stages", "prefixes"):
        for k, s in enumerate(manifest[kind]):
            expected = f"{'stage' if kind == 'stages' else 'prefix'}{k}"
            if s["name"] != expected:
                raise BundleError(f"{kind}[{k}] is named {s['name']!r}, expected {expected!r}")
            missing = [t for t in targets if t not in s["files"]]
            if missing:
                raise BundleError(f"{s['name']} has no file for target(s) {missing} listed in targets")
            if sorted(s["accuracy"]) != sorted(supported):
                raise BundleError(f"{s['name']}: accuracy must give one value per supported rule {supported}")
            out_names = [o["name"] for o in s["outputs"]]
            if s["logits"] not in out_names:
                raise BundleError(f"{s['name']}: logits {s['logits']!r} is not among its outputs {out_names}")
            if len(set(out_names)) != len(out_names):
                raise BundleError(f"{s['name']}: duplicate output names {out_names}")
            for o in s["outputs"]:
                if o["tensor"] != output_tensor_name(s["name"], o["name"]):
                    raise BundleError(f"{s['name']}: output {o['name']!r} has tensor name {o['tensor']!r}, "
                                      f"expected {output_tensor_name(s['name'], o['name'])!r}")
            for i in s["inputs"]:
                b = i["binding"]
                if i["tensor"] != tensor_name(b):
                    raise BundleError(f"{s['name']}: input {b!r} has tensor name {i['tensor']!r}, "
                                      f"expected {tensor_name(b)!r}")
                if b == INPUT:
                    continue
                if kind == "prefixes":
                    raise BundleError(f"{s['name']}: a prefix reads only 'input', not {b!r}")
                src, _, name = b.partition(":")
                if src not in produced or name not in produced[src]:
                    raise BundleError(f"{s['name']} input {b!r} is not produced by an earlier stage")
            if kind == "stages":
                produced[s["name"]] = {o["name"]: o["tensor"] for o in s["outputs"]}
                total += s["members"]
                if s["members_total"] != total:
                    raise BundleError(f"{s['name']}: members_total {s['members_total']} != {total} "
                                      "(sum of members of stages 0..k)")
            else:
                last = s["last_stage"]
                if last >= len(manifest["stages"]):
                    raise BundleError(f"{s['name']}: last_stage {last} is beyond the last stage")
                want = manifest["stages"][last]["members_total"]
                if s["members"] != want or s["members_total"] != want:
                    raise BundleError(f"{s['name']}: members {s['members']} differs from the {want} members "
                                      f"of stages 0..{last}")
    for k, s in enumerate(manifest["stages"]):
        if s.get("last_stage", k) != k:
            raise BundleError(f"{s['name']}: last_stage must be {k}")
    _check_preprocessing(manifest)
    _check_shapes(manifest)
    _check_paths(manifest)


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _check_shape(what: str, shape: Sequence[Any]) -> None:
    """A declared shape is ``[null, d1, ...]`` with few dimensions and a bounded sample size."""
    if len(shape) > MAX_RANK:
        raise BundleError(f"{what} has {len(shape)} dimensions {_shape_text(shape)}; at most {MAX_RANK} are allowed")
    elements = 1
    for d in shape[1:]:
        if d is not None:
            elements *= d
    if elements > MAX_SAMPLE_ELEMENTS:
        raise BundleError(f"{what} declares shape {_shape_text(shape)}: {elements:,} elements per sample, more than "
                          f"the {MAX_SAMPLE_ELEMENTS:,} a bundle may declare (a damaged or hand-edited manifest?)")


def _check_shapes(manifest: dict[str, Any]) -> None:
    """The manifest agrees with itself: every tensor's shape is bounded, an input has the shape and
    dtype of what its binding names (the bundle input or an earlier stage's output), and every
    graph's logits are ``[N, len(classes)]`` floats. The graphs are checked against these shapes
    when their sessions open (:class:`kdedge.targets.ort_session.OrtSession`)."""
    classes = len(manifest["classes"])
    in_shape = list(manifest["input"]["shape"])
    _check_shape("input", in_shape)
    produced: dict[str, dict[str, Any]] = {}  # binding "stageK:NAME" -> its output entry
    for kind in ("stages", "prefixes"):
        for s in manifest[kind]:
            tensors = [i["tensor"] for i in s["inputs"]]
            if len(set(tensors)) != len(tensors):
                raise BundleError(f"{s['name']} lists an input twice: {tensors}")
            for i in s["inputs"]:
                what = f"{s['name']} input {i['tensor']!r}"
                _check_shape(what, i["shape"])
                if i["binding"] == INPUT:
                    want, want_dtype, source = in_shape, "float32", "the bundle input"
                else:
                    o = produced[i["binding"]]  # _check_wiring made sure it exists
                    want, want_dtype, source = o["shape"], o["dtype"], f"output {i['binding']!r}"
                if list(i["shape"]) != list(want) or i["dtype"] != want_dtype:
                    raise BundleError(f"{what} is declared {_shape_text(i['shape'])} {i['dtype']}, but it reads "
                                      f"{source}, which is {_shape_text(want)} {want_dtype}")
            for o in s["outputs"]:
                _check_shape(f"{s['name']} output {o['tensor']!r}", o["shape"])
                if kind == "stages":
                    produced[f"{s['name']}:{o['name']}"] = o
                logits_ok = list(o["shape"]) == [None, classes] and o["dtype"] in LOGITS_DTYPES
                if o["name"] == s["logits"] and not logits_ok:
                    raise BundleError(f"{s['name']} logits {o['tensor']!r} are declared {_shape_text(o['shape'])} "
                                      f"{o['dtype']}; with {classes} classes they must be [N, {classes}] "
                                      f"{' or '.join(LOGITS_DTYPES)} (classes and graphs disagree)")


def _check_preprocessing(manifest: dict[str, Any]) -> None:
    """The preprocessing rule maps every raw value (0..255) to a finite float32: a tiny ``std``
    or a huge ``scale`` would turn every image into inf, which would be reported as bad input."""
    p = manifest["preprocessing"]
    resize, size = p["resize"], p["input_size"]
    if resize is not None and resize < max(size):
        raise BundleError(f"preprocessing.resize {resize} is smaller than the crop input_size {size}: the crop "
                          "would not fit in a square image resized to it")
    if resize is not None and resize * resize > MAX_SAMPLE_ELEMENTS:
        raise BundleError(f"preprocessing.resize {resize} would make images of at least {resize}x{resize} pixels, "
                          f"more than the {MAX_SAMPLE_ELEMENTS:,} a bundle may declare")
    f32 = float(np.finfo(np.float32).max)
    for c, (mean, std) in enumerate(zip(p["mean"], p["std"])):
        lo, hi = (0.0 - mean) / std, (255.0 * p["scale"] - mean) / std
        if not all(math.isfinite(v) and abs(v) < f32 for v in (lo, hi)) or np.float32(std) == 0:
            raise BundleError(f"preprocessing of channel {c} (scale {p['scale']:g}, mean {mean:g}, std {std:g}) "
                              "does not give finite float32 values")


def _listed_files(manifest: dict[str, Any]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(what, target or None for reports, file entry) for every checksummed file of the manifest."""
    out: list[tuple[str, str | None, dict[str, Any]]] = []
    for kind in ("stages", "prefixes"):
        for s in manifest[kind]:
            for target, f in s["files"].items():
                out.append((f"{s['name']} ({target})", target, f))
    for name, f in manifest.get("reports", {}).items():
        out.append((f"report {name}", None, f))
    return out


def _check_paths(manifest: dict[str, Any]) -> None:
    """Paths stay inside the bundle, and each names one file, except that entries of one target
    may share a path as the functions of one package (schema version 2 on): every entry sharing
    it names a distinct ``function`` and records the same ``sha256`` and ``bytes``."""
    seen: dict[str, list[tuple[str, str | None, dict[str, Any]]]] = {}
    for what, target, f in _listed_files(manifest):
        p = PurePosixPath(f["path"])
        if p.is_absolute() or ".." in p.parts or f["path"] in ("", ".") or "\\" in f["path"]:
            raise BundleError(f"{what}: file path {f['path']!r} must be relative to the bundle, without '..'")
        if any(ord(c) < 32 or c == "\x7f" for c in f["path"]):
            raise BundleError(f"{what}: file path {f['path']!r} holds a control character (a NUL byte, a newline, …); "
                              "no file of a bundle has one, re-export the bundle")
        seen.setdefault(f["path"], []).append((what, target, f))
    for path, users in seen.items():
        if len(users) == 1:
            continue
        (what0, target0, f0), what1 = users[0], users[1][0]
        if manifest["schema_version"] < SHARED_PATHS_SINCE:
            raise BundleError(f"{what1} and {what0} name the same file {path!r}")
        for what, target, _ in users:
            if target is None or target != target0:
                other = what1 if what == what0 else what0
                raise BundleError(f"{what} and {other} name the same file {path!r}; only the entries of one target "
                                  "may share a path")
        for what, _, f in users:
            if not f.get("function"):
                raise BundleError(f"{what} shares the path {path!r} with {what1 if what == what0 else what0} but "
                                  "names no 'function'; entries may share a path only as functions of one package")
        functions: dict[str, str] = {}
        for what, _, f in users:
            if f["function"] in functions:
                raise BundleError(f"{what} and {functions[f['function']]} both name function {f['function']!r} "
                                  f"of {path!r}; each entry sharing a package names its own function")
            functions[f["function"]] = what
            if (f["sha256"], f["bytes"]) != (f0["sha256"], f0["bytes"]):
                raise BundleError(f"{what} and {what0} share {path!r} but record different sha256 or bytes")


def _strict_validator() -> Any:
    """A JSON-schema validator whose ``integer`` is a JSON integer only: the standard one also
    accepts ``8.0``, which would reach numpy as a float shape and fail far from the manifest."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
    return jsonschema.validators.extend(base, type_checker=checker)(load_schema())


MAX_INT = 2**63 - 1  # the largest integer a manifest may hold (file sizes, MACs, counts)


def _nonfinite(obj: Any) -> str | None:
    """The path (``stages/0/accuracy/last``) of the first non-finite float, or of an integer
    beyond ±(2**63 - 1) (``10**400`` parses as a Python int, and no count or size is that big;
    a float conversion of it overflows far from the manifest), inside ``obj``, or None.

    Iterative, so a deeply nested dict built in Python cannot overflow the stack. Strict JSON
    refuses ``NaN`` literals, but ``1e400`` still parses as infinity, and a manifest dict may
    come from code rather than a file."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or "(top level)"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            return where or "(top level)"
        if isinstance(v, dict):
            stack.extend((f"{where}/{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}/{i}" if where else str(i), x) for i, x in enumerate(v))
    return None


def validate_manifest(manifest: dict[str, Any], where: str = "manifest") -> None:
    """Check a manifest dict: format and version, finite numbers, the JSON schema, then the
    wiring and consistency rules (every message starts with ``where``).

    Raises:
        BundleVersionError: a newer schema version.
        BundleError: anything else, naming the first problem.
    """
    check_version(manifest, where)
    bad = _nonfinite(manifest)
    if bad is not None:
        raise BundleError(f"{where}: the manifest holds a non-finite number (NaN or infinity) or an integer beyond "
                          f"2**63 at {bad}; a kdedge manifest never does (damaged or hand-edited?), re-export the bundle")
    errors = sorted(_strict_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        loc = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise BundleError(f"{where} does not match the bundle schema at {loc}: {e.message[:300]}{more}")
    try:
        _check_wiring(manifest)
    except BundleError as e:
        raise BundleError(f"{where}: {e}") from None


def _entry_problem(path: Path, what: str, f: dict[str, Any]) -> tuple[type[BundleError], str] | None:
    """Why the file (or package directory) of entry ``f`` is not the one the manifest records,
    as (error class, one line), or None when it is intact.

    Only regular files and directories of regular files are read (a FIFO or device in their
    place is named, never opened); sizes are compared before anything is hashed."""
    try:
        root = path.resolve()
        full = (path / f["path"]).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a link loop (RuntimeError before 3.13), a NUL byte
        return BundleError, f"bundle {path}: {what} file {f['path']!r} cannot be resolved ({e})"
    if root not in full.parents:
        return BundleError, f"bundle {path}: {what} file {f['path']!r} points outside the bundle"
    try:
        mode = os.stat(full).st_mode
    except FileNotFoundError:
        return BundleError, f"bundle {path} is incomplete: {what} file {f['path']} is missing"
    except OSError as e:
        return BundleError, f"bundle {path}: cannot read {what} file {f['path']}: {e.strerror or e}"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return BundleError, (f"bundle {path}: {what} file {f['path']} is {file_kind(mode)}, not a regular file; "
                             "re-export the bundle")
    try:
        size = path_bytes(full)
        if size != f["bytes"]:
            return ChecksumError, (f"bundle {path}: {what} file {f['path']} has {size} bytes, the manifest records "
                                   f"{f['bytes']}; the file was modified or truncated, re-export the bundle")
        digest = sha256_path(full)
    except BundleError as e:
        return BundleError, f"bundle {path}: {what}: {e}"
    except OSError as e:
        return BundleError, f"bundle {path}: cannot read {what} file {f['path']}: {e.strerror or e}"
    if digest != f["sha256"]:
        return ChecksumError, (f"bundle {path}: {what} file {f['path']} has sha256 {digest[:12]}…, the manifest "
                               f"records {f['sha256'][:12]}…; the file was modified or damaged, re-export the bundle")
    return None


def check_entry(path: str | Path, f: dict[str, Any], what: str = "file") -> str | None:
    """None when bundle ``path``'s file entry ``f`` is intact, else the problem in one line
    (what ``kdedge inspect`` reports without refusing the bundle)."""
    problem = _entry_problem(Path(path), what, f)
    return None if problem is None else problem[1]


def verify_files(path: Path, manifest: dict[str, Any], targets: Sequence[str] | None = None) -> None:
    """Check that every listed file exists inside ``path`` with its recorded size and sha256.

    Args:
        targets: check only the stage files of these targets (reports are always checked);
            None checks every file.

    Raises:
        BundleError: a file is missing, outside the bundle or not a regular file.
        ChecksumError: a file's size or sha256 differs from the manifest's.
    """
    checked: set[str] = set()  # a shared path (one package, several functions) is hashed once
    for what, target, f in _listed_files(manifest):
        if targets is not None and target is not None and target not in targets:
            continue
        if f["path"] in checked:  # _check_paths made every entry sharing it record the same digest
            continue
        checked.add(f["path"])
        problem = _entry_problem(path, what, f)
        if problem is not None:
            raise problem[0](problem[1])


