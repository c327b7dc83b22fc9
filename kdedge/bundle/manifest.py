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
(:mod:`kdedge.targets.session`). Every failure is one line naming the bundle.

Example:
    >>> b = open_bundle("model.kdedge")
    >>> [s.name for s in b.stages], b.combine_default
    (['stage0', 'stage1'], 'mean_logits')
    >>> b.file(b.stages[0], "onnx")
    PosixPath('model.kdedge/onnx/stage0.onnx')
"""


from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

from kdedge.bundle.errors import BundleError
from kdedge.bundle.files import describe_path, file_kind
from kdedge.bundle.inputs import InputSpec
from kdedge.bundle.names import MANIFEST
from kdedge.bundle.validate import validate_manifest, verify_files


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

    @cached_property
    def input_info(self) -> InputSpec:
        """The preprocessing rule and classes (:class:`~kdedge.bundle.inputs.InputSpec`)."""
        return InputSpec.from_manifest(self.manifest)

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
        if (path / "run.json").is_file():
            raise BundleError(f"{path} is a training run directory, not a bundle; make one with "
                              f"`kdedge export {path} --out BUNDLE.kdedge`")
        raise BundleError(f"{path} is not a complete bundle: {MANIFEST} is missing (an interrupted export?)")
    if mpath.is_symlink():  # the manifest is the bundle's own file, as its stage files are
        try:
            inside = path.resolve() in mpath.resolve().parents
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
            inside = False
        if not inside:
            raise BundleError(f"bundle {path}: {MANIFEST} is a symbolic link to {os.readlink(mpath)!r}, outside the "
                              "bundle; a bundle's manifest must be its own file, re-export or copy the bundle")
    try:
        manifest = read_json_strict(mpath, what=str(mpath))
    except JSONError as e:
        raise BundleError(str(e)) from None
    except FileNotFoundError:
        raise BundleError(f"{path} is not a complete bundle: {describe_path(mpath)}") from None
    validate_manifest(manifest, where=f"bundle {path}")
    return manifest


def open_bundle(path: str | Path, *, targets: Sequence[str] | None = None, verify: bool = True,
                missing: Callable[[Path, dict[str, Any], str], str] | None = None) -> Bundle:
    """Open a bundle directory: validate the manifest and check every file's sha256.

    Args:
        path: the bundle directory.
        targets: check only these targets' stage files (None: all). A target the bundle lacks
            raises.
        verify: check checksums (leave True; False is for tools that repair bundles).
        missing: the message for a target of ``targets`` the bundle lacks, from (path, manifest,
            target) (:func:`kdedge.targets.missing_target_message` says how to add its files).

    Returns:
        a :class:`Bundle`.

    Raises:
        BundleVersionError: the bundle needs a newer kdedge.
        ChecksumError: a file differs from its recorded sha256.
        BundleError: anything else wrong, with a one-line message.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if targets is not None:
        absent = [t for t in targets if t not in manifest["targets"]]
        if absent:
            raise BundleError(missing(path, manifest, absent[0]) if missing else
                              f"bundle {path} has no {absent[0]!r} files (it holds {', '.join(manifest['targets'])})")
    if verify:
        verify_files(path, manifest, targets)
    return Bundle(
        path=path,
        manifest=manifest,
        stages=tuple(StageEntry.from_dict(s, k) for k, s in enumerate(manifest["stages"])),
        prefixes=tuple(StageEntry.from_dict(s, k) for k, s in enumerate(manifest["prefixes"])),
    )


__all__ = ["Bundle", "FileEntry", "StageEntry", "TensorEntry", "open_bundle", "read_manifest"]
