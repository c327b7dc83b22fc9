"""Export targets: one module per runtime (onnxruntime, tensorrt, coreml, torch), behind
:class:`kdedge.targets.base.Target`.

The registry is a plain dict of name -> ``"module:Class"``; a target's module is imported only
when it is asked for, so a missing runtime library never breaks the others, and importing this
package needs neither torch nor any runtime.

Example:
    >>> from kdedge.targets import get_target, target_table
    >>> get_target("onnx").caps.precisions
    ('fp32', 'int8')
    >>> target_table()["torch"]["compile"]
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kdedge.registry import load, suggest
from kdedge.targets.base import (
    Capabilities,
    CompiledFile,
    CompileSpec,
    GraphSource,
    RunSpec,
    Target,
    TargetError,
    TargetUnavailable,
)

__all__ = ["Capabilities", "CompileSpec", "CompiledFile", "GraphSource", "PREFERENCE", "RunSpec", "TARGETS", "Target",
           "TargetError", "TargetUnavailable", "format_table", "get_target", "missing_target_message", "open_bundle",
           "pick_target", "target_table"]

# name -> "module:Class"; the name is the --target value and the manifest's files key
TARGETS: dict[str, str] = {
    "onnx": "kdedge.targets.onnxruntime:OnnxRuntimeTarget",
    "torch": "kdedge.targets.torch_export:TorchExportTarget",
    "coreml": "kdedge.targets.coreml:CoreMLTarget",
    "tensorrt": "kdedge.targets.tensorrt:TensorRTTarget",
}

# targets for tests only: not listed in the format table, not picked automatically
TEST_TARGETS: dict[str, str] = {
    "fake": "kdedge.targets.fake:FakeTarget",
}

# which of a bundle's targets the runner picks with target="auto", fastest first
PREFERENCE = ("tensorrt", "coreml", "torch", "onnx")

_CACHE: dict[str, Target] = {}


def get_target(name: str) -> Target:
    """The target called ``name`` (an instance; cached).

    Raises:
        TargetError: unknown name (the message lists the known ones).
    """
    if name in _CACHE:
        return _CACHE[name]
    where = TARGETS.get(name) or TEST_TARGETS.get(name)
    if where is None:
        hint = suggest(str(name), TARGETS)
        hint = f" ({hint})" if hint.startswith("did") else ""
        raise TargetError(f"unknown target {name!r}{hint}; known: {', '.join(TARGETS)}")
    target = load(where)()
    _CACHE[name] = target
    return target


def target_table() -> dict[str, dict[str, Any]]:
    """``{name: {"compile": bool, "run": bool, "precisions": [...], ...}}`` for every target."""
    return {name: get_target(name).info() for name in TARGETS}


def format_table() -> str:
    """The target table as text (``kdedge export --help``, ``kdedge doctor``)."""
    rows = [f"{'target':<9} {'precisions':<15} {'from':<7} {'compile':<8} {'run':<4} description"]
    for name, t in target_table().items():
        rows.append(f"{name:<9} {','.join(t['precisions']):<15} {t['source']:<7} "
                    f"{'yes' if t['compile'] else 'no':<8} {'yes' if t['run'] else 'no':<4} {t['description']}")
    return "\n".join(rows)


def pick_target(available: Sequence[str]) -> str:
    """The first target of :data:`PREFERENCE` that the bundle holds (``available``) and that runs here.

    Raises:
        TargetError: none of them runs here (the message names what to install).
    """
    for name in PREFERENCE:
        if name in available and get_target(name).can_run():
            return name
    for name in available:  # targets outside PREFERENCE (tests' fake target)
        if name not in PREFERENCE and name in TEST_TARGETS and get_target(name).can_run():
            return name
    extras = ", ".join(f"{n}: pip install 'kdedge[{get_target(n).extra}]'" for n in available if n in TARGETS)
    raise TargetUnavailable(f"none of the bundle's targets ({', '.join(available)}) can run here; {extras}")


def missing_target_message(path: str | Path, manifest: dict[str, Any], target: str) -> str:
    """The error for a known target whose files the bundle lacks, with the way to add them:
    ``kdedge build`` on the device for targets compiled from the ONNX (TensorRT), a new export
    from the training run for those compiled from the stage modules (torch, CoreML)."""
    held = ", ".join(manifest["targets"])
    if target != "onnx" and get_target(target).caps.source == "onnx" and "onnx" in manifest["targets"]:
        how = f"build them on the device with: kdedge build {path} --target {target}"
    else:
        run_dir = (manifest.get("provenance") or {}).get("run_dir") or "RUN_DIR"
        how = f"export the training run again with them: kdedge export {run_dir} --target {target}"
    return f"bundle {path} has no {target!r} files (it holds {held}); {how}"


def open_bundle(path: str | Path, *, targets: Sequence[str] | None = None, verify: bool = True) -> Any:
    """:func:`kdedge.bundle.open_bundle` for running or building ``targets``: an unknown target
    name fails first (:class:`TargetError`, with a close match), and a known one the bundle lacks
    says how to add its files (``kdedge build`` or a new export). This is ``kdedge.runtime.open_bundle``.

    Raises:
        TargetError: a name in ``targets`` that is no known target.
        BundleError, BundleVersionError, ChecksumError: as :func:`kdedge.bundle.open_bundle`.
    """
    from kdedge.bundle.manifest import open_bundle as open_plain

    for name in targets or ():
        get_target(name)
    return open_plain(path, targets=targets, verify=verify, missing=missing_target_message)
