"""The bundle's names: format constants, the binding grammar and graph tensor names (docs/bundle.md).

A stage input is bound to ``"input"`` (the model input) or to ``"stageK:NAME"`` (output NAME of an
earlier stage K); inside a stage file that input is the tensor ``stageK__NAME``, the very name
stage K gives its output, so outputs feed later inputs without renaming.
"""

from __future__ import annotations

import re

from kdedge.bundle.combine import COMBINE_RULES  # re-exported: the rule names have one home
from kdedge.bundle.errors import BundleError

__all__ = ["COMBINE_RULES", "FORMAT", "INPUT", "LOGITS_DTYPES", "MANIFEST", "MAX_RANK", "MAX_SAMPLE_ELEMENTS",
           "PRECISIONS", "SCHEMA_INTRODUCED_IN", "SCHEMA_VERSION", "SHARED_PATHS_SINCE", "output_tensor_name",
           "parse_binding", "safe_name", "tensor_name"]

FORMAT = "kdedge-bundle"
# 2: a target's file entries may share one path as functions of one package (``function``)
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
INPUT = "input"
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


def parse_binding(binding: str) -> tuple[int, str] | None:
    """``(K, NAME)`` of ``"stageK:NAME"``, None for ``"input"``.

    Raises:
        BundleError: neither ``"input"`` nor ``"stageK:NAME"``.
    """
    if binding == INPUT:
        return None
    m = _BINDING.match(binding)
    if m is None:
        raise BundleError(f"bad binding {binding!r}: expected 'input' or 'stageK:NAME'")
    return int(m.group(1)), m.group(2)


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
    parsed = parse_binding(binding)
    if parsed is None:
        return INPUT
    return f"stage{parsed[0]}__{safe_name(parsed[1])}"


def output_tensor_name(graph: str, output: str) -> str:
    """Graph tensor name of output ``output`` of stage or prefix ``graph``: ``graph__output``."""
    return f"{graph}__{safe_name(output)}"
