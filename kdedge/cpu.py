"""What this CPU can do that changes a result (stdlib only): its 8-bit dot-product instructions.

onnxruntime's INT8 kernels on x86 pick their inner loop from the CPU: with VNNI (AVX512_VNNI or
AVX_VNNI) a uint8 x int8 product accumulates straight into int32; without it (AVX2, AVX-512
without VNNI) ``VPMADDUBSW`` first adds pairs of products into a saturating int16, which clips
when the weights use the full 8-bit range (kdedge.export.quantize explains the schemes). ARM's
kernels (SDOT/UDOT or widening multiplies) do not saturate.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

CPUINFO = "/proc/cpuinfo"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")


def _flags(cpuinfo: str) -> set[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@lru_cache(maxsize=None)
def int8_dot(cpuinfo: str = CPUINFO, machine: str | None = None) -> str:
    """How this CPU multiplies 8-bit integers in onnxruntime: ``vnni`` (x86, exact),
    ``pairwise-int16`` (x86 without VNNI: saturates with full-range weights), ``arm`` or
    ``unknown`` (not x86 or the flags could not be read)."""
    machine = machine or platform.machine()
    if not is_x86(machine):
        return "arm" if machine.lower() in ("aarch64", "arm64") else "unknown"
    flags = _flags(cpuinfo)
    if not flags:
        return "unknown"
    return "vnni" if any(f in flags for f in VNNI_FLAGS) else "pairwise-int16"


def saturates_full_range_int8(cpuinfo: str = CPUINFO, machine: str | None = None) -> bool:
    """Whether onnxruntime's INT8 kernels here can clip with 8-bit (not 7-bit) weights."""
    return int8_dot(cpuinfo, machine) == "pairwise-int16"
