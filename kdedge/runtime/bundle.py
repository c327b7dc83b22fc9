"""The bundle: a directory holding a schema-versioned ``manifest.json`` and one file per stage.

This module reads and checks bundles. It imports numpy, jsonschema and the standard library
only (no torch): the device runtime opens bundles with it. ``kdedge.export`` writes bundles
with the same schema and helpers. Every field is documented in ``docs/bundle.md``.

Opening a bundle checks, in this order: ``manifest.json`` parses as strict JSON
(:func:`kdedge.io.read_json_strict`: a regular file, bounded size and nesting, no NaN, no
duplicate keys); ``format`` is ``kdedge-bundle``; ``schema_version`` is one this kdedge reads (a
newer one fails with a message naming the kdedge version to upgrade to); no number is
non-finite; the manifest validates against ``kdedge/schemas/manifest.schema.json`` (integers
are JSON integers) and the rules JSON Schema cannot express: wiring (bindings point backwards,
tensor names follow the naming convention, the default combine rule is supported) and
consistency (logits are ``[N, len(classes)]``, an input has the shape and dtype of what it is
bound to, shapes are bounded, preprocessing gives finite values); every file the manifest lists
is a regular file (or package directory) inside the bundle with the recorded size and sha256 (a
path that several entries share, the functions of one CoreML package, is checked once). The
graphs themselves are checked against the manifest when their sessions open
(:mod:`kdedge.runtime.sessions`). Every failure is one line naming the bundle.

Example:
    >>> b = open_bundle("model.kdedge")
    >>> [s.name for s in b.stages], b.combine_default
    (['stage0', 'stage1'], 'mean_logits')
    >>> b.file(b.stages[0], "onnx")
    PosixPath('model.kdedge/onnx/stage0.onnx')
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from kdedge.runtime.files import NotRegularFile, describe_path, file_kind, open_regular

FORMAT = "kdedge-bundle"
# 2: a target's file entries may share one path as functions of one package (``function``)
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
INPUT = "input"
COMBINE_RULES = ("mean_logits", "mean_probs", "last")
PRECISIONS = ("fp32", "fp16", "int8")

# The kdedge release that introduced each schema version; a reader too old for a bundle
# names the release to upgrade to (the writer's own version is recorded too, as a fallback).
SCHEMA_INTRODUCED_IN = {1: "0.1.0", 2: "0.1.0"}
# the first schema version in which a target's entries may share a path (each naming a function)
SHARED_PATHS_SINCE = 2

# Bounds on what a manifest may declare, far above any model kdedge exports: a hand-edited shape
# must fail as one line at open time, not as a terabyte allocation when the runner binds buffers.
MAX_RANK = 8                       # dimensions of a tensor
MAX_SAMPLE_ELEMENTS = 1 << 28      # elements of one sample of one tensor (1 GiB of float32)
LOGITS_DTYPES = ("float32", "float16")

_SAFE = re.compile(r"[^A-Za-z0-9_]")
_BINDING = re.compile(r"^stage(0|[1-9][0-9]*):(.+)$")


class BundleError(ValueError):
    """A bundle that cannot be used: missing, malformed, tampered with, or of another format."""


class BundleVersionError(BundleError):
    """A bundle written with a newer manifest schema than this kdedge reads."""


class ChecksumError(BundleError):
    """A bundle file whose content differs from the sha256 recorded in the manifest."""


# ---------------------------------------------------------------------------------------------
# naming convention and checksums


def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_]`` replaced by ``_``."""
    return _SAFE.sub("_", text)


def tensor_name(binding: str) -> str:
    """Graph tensor name of an input binding: ``"input"`` stays, ``"stageK:NAME"`` becomes
    ``"stageK__NAME"`` (NAME made safe). Output ``NAME`` of stage K has the same name, so an
    output can be fed to a later stage's input without renaming.

    Example:
        >>> tensor_name("stage0:f1"), tensor_name("input")
        ('stage0__f1', 'input')
    """
    if binding == INPUT:
        return INPUT
    m = _BINDING.match(binding)
    if m is None:
        raise BundleError(f"bad binding {binding!r}: expected 'input' or 'stageK:NAME'")
    return f"stage{m.group(1)}__{safe_name(m.group(2))}"


def output_tensor_name(graph: str, output: str) -> str:
    """Graph tensor name of output ``output`` of stage or prefix ``graph``: ``graph__output``."""
    return f"{graph}__{safe_name(output)}"


def package_files(path: str | Path) -> list[tuple[str, Path]]:
    """The regular files under directory ``path`` as ``(relative POSIX path, path)``, sorted by the
    relative path (code point order, which is also UTF-8 byte order).

    Symbolic links are refused, not followed: a package is checksummed as the bytes it holds, and
    a link could point at anything outside it. So are other special files, and names that are not
    UTF-8 or hold a newline (they would make the digest's lines ambiguous).

    Raises:
        BundleError: a symbolic link, special file or unusable name inside ``path``.
    """
    root = Path(path)
    out: list[tuple[str, Path]] = []

    def fail(e: OSError) -> None:
        raise BundleError(f"cannot read {e.filename}: {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        for name in (*dirnames, *filenames):  # a link to a directory is listed in dirnames, never entered
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise BundleError(f"{root}: the name {rel!r} is not UTF-8; a package must hold UTF-8 names") from None
            if "\n" in rel:
                raise BundleError(f"{root}: the name {rel!r} holds a newline; a package cannot be checksummed with it")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{root} holds a symbolic link {rel!r}; a package directory must hold regular files "
                                  "only (links are not followed), re-export the bundle")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"{root} holds {rel!r}, which is not a regular file; re-export the bundle")
            out.append((rel, full))
    out.sort(key=lambda t: t[0])
    return out


def sha256_path(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file; of a directory (e.g. a CoreML ``.mlpackage``): the sha256 of
    the UTF-8 lines ``"<relative posix path>\\0<sha256 hex of that file>\\n"`` over its regular
    files, sorted by path (:func:`package_files`; empty directories do not count, symbolic links
    are refused).

    Raises:
        BundleError: a directory holding a symbolic link or a special file.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for rel, f in package_files(path):
            h.update(f"{rel}\0{sha256_path(f, chunk)}\n".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    try:
        fh = open_regular(path)  # a FIFO or device inside a bundle must not hang the check
    except NotRegularFile as e:
        raise BundleError(str(e)) from None
    with fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def path_bytes(path: str | Path) -> int:
    """Size in bytes of a file, or the total size of the regular files of a directory
    (:func:`package_files`: symbolic links are refused)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for _, f in package_files(path))
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# combine rules (the formulas of docs/bundle.md, in numpy)


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64: the row maximum is subtracted
    first, so finite logits give finite probabilities however large they are."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def combine(rule: str, logits: Sequence[np.ndarray], members: Sequence[int]) -> np.ndarray:
    """Class probabilities after the completed stages ``0..k`` (``len(logits) == k + 1``).

    - ``mean_logits``: softmax(Σ_j logits_j / Σ_j members_j)
    - ``mean_probs``: mean_j softmax(logits_j / members_j)
    - ``last``: softmax(logits_k / members_k)

    ``logits_j`` is stage j's logits output: the SUM of the logits of its ``members_j`` members.

    Raises:
        ValueError: no stage, mismatched lengths, an unknown rule, or logits holding NaN or
            infinity (probabilities from them would be NaN: refused, not returned).
    """
    if not len(logits):
        raise ValueError("combine needs at least one completed stage")
    if len(logits) != len(members):
        raise ValueError(f"combine: {len(logits)} logits arrays for {len(members)} member counts")
    arrays = [np.asarray(lg, np.float64) for lg in logits]
    for j, a in enumerate(arrays):
        if not np.isfinite(a).all():
            raise ValueError(f"combine: the logits of stage {j} hold NaN or infinite values")
    if rule == "mean_logits":
        return softmax(np.sum(arrays, axis=0) / float(sum(members)))
    if rule == "mean_probs":
        return np.mean([softmax(a / m) for a, m in zip(arrays, members)], axis=0)
    if rule == "last":
        return softmax(arrays[-1] / members[-1])
    raise ValueError(f"unknown combine rule {rule!r}; known: {', '.join(COMBINE_RULES)}")


# ---------------------------------------------------------------------------------------------
# typed views of the manifest


@dataclass(frozen=True)
class FileEntry:
    """One stage file for one target. ``function``: the graph's function inside a package that
    several entries share (a CoreML multifunction ``.mlpackage``); None for a file of its own."""

    path: str
    sha256: str
    bytes: int
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific facts (opset, exporter)
    function: str | None = None


@dataclass(frozen=True)
class TensorEntry:
    """One graph input or output: ``tensor`` is its name inside the stage file.

    Inputs carry ``binding`` (``"input"`` or ``"stageK:NAME"``); outputs carry ``name`` (the
    stage's output name).
    """

    tensor: str
    shape: tuple[int | None, ...]
    dtype: str
    binding: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class StageEntry:
    """A stage (or fused prefix) of the bundle, in execution order."""

    name: str
    index: int
    files: dict[str, FileEntry]
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    logits: str
    members: int
    members_total: int
    macs: int
    params: int
    accuracy: dict[str, float]
    last_stage: int

    @property
    def logits_tensor(self) -> str:
        """Graph tensor name of the logits output."""
        for o in self.outputs:
            if o.name == self.logits:
                return o.tensor
        raise BundleError(f"{self.name}: logits output {self.logits!r} is not among its outputs")

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int) -> StageEntry:
        files = {
            t: FileEntry(f["path"], f["sha256"], int(f["bytes"]), f["precision"],
                         {k: v for k, v in f.items() if k not in ("path", "sha256", "bytes", "precision", "function")},
                         function=f.get("function"))
            for t, f in d["files"].items()
        }
        inputs = tuple(TensorEntry(i["tensor"], tuple(i["shape"]), i["dtype"], binding=i["binding"]) for i in d["inputs"])
        outputs = tuple(TensorEntry(o["tensor"], tuple(o["shape"]), o["dtype"], name=o["name"]) for o in d["outputs"])
        return cls(name=d["name"], index=index, files=files, inputs=inputs, outputs=outputs, logits=d["logits"],
                   members=int(d["members"]), members_total=int(d["members_total"]), macs=int(d["macs"]),
                   params=int(d["params"]), accuracy=dict(d.get("accuracy", {})),
                   last_stage=int(d.get("last_stage", index)))


@dataclass(frozen=True)
class InputInfo:
    """The model input rule of a bundle, with the attribute names of
    :class:`kdedge.train.data.DatasetInfo`, so ``kdedge.preprocess.preprocess(raw, bundle.input_info)``
    turns raw images into the model input without torch."""

    name: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    channel_order: str
    class_names: tuple[str, ...]
    resize: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "scale": self.scale, "channel_order": self.channel_order, "class_names": list(self.class_names),
                "resize": self.resize}


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle. ``manifest`` is the raw JSON dict (see docs/bundle.md)."""

    path: Path
    manifest: dict[str, Any]
    stages: tuple[StageEntry, ...]
    prefixes: tuple[StageEntry, ...]

    @property
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """``(None, C, H, W)``."""
        return tuple(self.manifest["input"]["shape"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.manifest["preprocessing"])

    @property
    def input_info(self) -> InputInfo:
        """The preprocessing rule and classes (see :class:`InputInfo`)."""
        p = self.manifest["preprocessing"]
        return InputInfo(name=str(p["dataset"]), num_classes=self.num_classes, in_channels=int(self.input_shape[1]),
                         input_size=(int(p["input_size"][0]), int(p["input_size"][1])),
                         mean=tuple(float(v) for v in p["mean"]), std=tuple(float(v) for v in p["std"]),
                         scale=float(p["scale"]), channel_order=str(p["channel_order"]), class_names=tuple(self.classes),
                         resize=None if p["resize"] is None else int(p["resize"]))

    @property
    def combine_default(self) -> str:
        return str(self.manifest["combine"]["default"])

    @property
    def combine_supported(self) -> tuple[str, ...]:
        return tuple(self.manifest["combine"]["supported"])

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.manifest["targets"])

    @property
    def profiles_dir(self) -> Path:
        return self.path / "profiles"

    def file(self, stage: StageEntry, target: str) -> Path:
        """Absolute path of ``stage``'s file for ``target``."""
        if target not in stage.files:
            raise BundleError(f"bundle {self.path} has no {target!r} file for {stage.name}; "
                              f"it holds: {', '.join(sorted(stage.files)) or 'none'}")
        return self.path / stage.files[target].path

    def members_after(self, k: int) -> int:
        """Ensemble members averaged after stages 0..k."""
        return self.stages[k].members_total


# ---------------------------------------------------------------------------------------------
# schema and checks


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
    when their sessions open (:class:`kdedge.runtime.sessions.OrtSession`)."""
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


def _nonfinite(obj: Any) -> str | None:
    """The path (``stages/0/accuracy/last``) of the first non-finite float inside ``obj``, or None.

    Iterative, so a deeply nested dict built in Python cannot overflow the stack. Strict JSON
    refuses ``NaN`` literals, but ``1e400`` still parses as infinity, and a manifest dict may
    come from code rather than a file."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
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
        raise BundleError(f"{where}: the manifest holds a non-finite number (NaN or infinity) at {bad}; "
                          "a kdedge manifest never does (damaged or hand-edited?), re-export the bundle")
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
    except (OSError, RuntimeError) as e:  # a symbolic-link loop (RuntimeError before Python 3.13)
        return BundleError, f"bundle {path}: {what} file {f['path']} cannot be resolved ({e})"
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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``path/manifest.json`` (no file checksums).

    The manifest is read with :func:`kdedge.io.read_json_strict`: bounded size and nesting, no
    NaN, no duplicate keys, and only if it is a regular file (never a FIFO)."""
    from kdedge.io import JSONError, read_json_strict

    path = Path(path)
    if not path.exists():
        raise BundleError(describe_path(path, "bundle"))
    if not path.is_dir():
        kind = "a file" if path.is_file() else file_kind(path.stat().st_mode)
        raise BundleError(f"{path} is {kind}, not a bundle; a bundle is a directory holding {MANIFEST} "
                          "(from kdedge export)")
    mpath = path / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise BundleError(f"{path} is not a complete bundle: {MANIFEST} is missing (an interrupted export?)")
    try:
        manifest = read_json_strict(mpath, what=str(mpath))
    except JSONError as e:
        raise BundleError(str(e)) from None
    except FileNotFoundError:
        raise BundleError(f"{path} is not a complete bundle: {describe_path(mpath)}") from None
    validate_manifest(manifest, where=f"bundle {path}")
    return manifest


def missing_target_message(path: str | Path, manifest: dict[str, Any], target: str) -> str:
    """The error for a known target whose files the bundle lacks, with the way to add them:
    ``kdedge build`` on the device for targets compiled from the ONNX (TensorRT), a new export
    from the training run for those compiled from the stage modules (torch, CoreML)."""
    from kdedge.targets import get_target

    held = ", ".join(manifest["targets"])
    if target != "onnx" and get_target(target).caps.source == "onnx" and "onnx" in manifest["targets"]:
        how = f"build them on the device with: kdedge build {path} --target {target}"
    else:
        run_dir = (manifest.get("provenance") or {}).get("run_dir") or "RUN_DIR"
        how = f"export the training run again with them: kdedge export {run_dir} --target {target}"
    return f"bundle {path} has no {target!r} files (it holds {held}); {how}"


def open_bundle(path: str | Path, *, targets: Sequence[str] | None = None, verify: bool = True) -> Bundle:
    """Open a bundle directory: validate the manifest and check every file's sha256.

    Args:
        path: the bundle directory.
        targets: check only these targets' stage files (None: all). A target the bundle lacks
            raises.
        verify: check checksums (leave True; False is for tools that repair bundles).

    Returns:
        a :class:`Bundle`.

    Raises:
        BundleVersionError: the bundle needs a newer kdedge.
        ChecksumError: a file differs from its recorded sha256.
        TargetError: a name in ``targets`` that is no known target.
        BundleError: anything else wrong, with a one-line message.
    """
    path = Path(path)
    if targets is not None:
        from kdedge.targets import get_target  # the registry: no runtime library imported

        for t in targets:
            get_target(t)  # an unknown name fails first, with the known ones and a close match
    manifest = read_manifest(path)
    if targets is not None:
        missing = [t for t in targets if t not in manifest["targets"]]
        if missing:
            raise BundleError(missing_target_message(path, manifest, missing[0]))
    if verify:
        verify_files(path, manifest, targets)
    return Bundle(
        path=path,
        manifest=manifest,
        stages=tuple(StageEntry.from_dict(s, k) for k, s in enumerate(manifest["stages"])),
        prefixes=tuple(StageEntry.from_dict(s, k) for k, s in enumerate(manifest["prefixes"])),
    )


__all__ = [
    "Bundle", "BundleError", "BundleVersionError", "COMBINE_RULES", "ChecksumError", "FORMAT", "FileEntry", "InputInfo",
    "MANIFEST", "MAX_RANK", "MAX_SAMPLE_ELEMENTS", "PRECISIONS", "SCHEMA_VERSION", "SHARED_PATHS_SINCE", "StageEntry",
    "TensorEntry", "check_entry", "check_version", "combine", "load_schema", "missing_target_message", "open_bundle",
    "output_tensor_name", "package_files", "path_bytes", "read_manifest", "safe_name", "sha256_path", "softmax",
    "tensor_name", "validate_manifest", "verify_files",
]
