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

import importlib
from typing import Any, Sequence

from kdedge.targets.base import (Capabilities, CompiledFile, CompileSpec, GraphSource, RunSpec, Target,
                                 TargetError, TargetUnavailable)

__all__ = ["Capabilities", "CompileSpec", "CompiledFile", "GraphSource", "PREFERENCE", "RunSpec", "TARGETS", "Target",
           "TargetError", "TargetUnavailable", "format_table", "get_target", "pick_target", "target_table"]

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
        import difflib

        close = difflib.get_close_matches(str(name), list(TARGETS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TargetError(f"unknown target {name!r}{hint}; known: {', '.join(TARGETS)}")
    module, _, cls = where.partition(":")
    target = getattr(importlib.import_module(module), cls)()
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
