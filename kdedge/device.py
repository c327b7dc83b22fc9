"""Device identity: which machine this is and the setting it runs under, to key latency profiles.

:func:`device_id` names the machine (the board on a Jetson, else the CPU model and core count plus
the NVIDIA GPUs); :func:`current_setting` names its power/performance setting (the nvpmodel mode
on a Jetson, else ``cpu-{threads}t[-{governor}]``). Standard library only.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdedge.profile.modes import Nvpmodel, PowerMode

__all__ = ["CPUINFO", "CPU_ROOT", "DEVICE_TREE_MODEL", "DeviceSetting", "NVPMODEL_CONF", "cpu_governors",
           "cpu_model", "current_setting", "device_id", "slug"]

NVPMODEL_CONF = "/etc/nvpmodel.conf"
CPU_ROOT = "/sys/devices/system/cpu"
DEVICE_TREE_MODEL = "/proc/device-tree/model"
CPUINFO = "/proc/cpuinfo"


def cpu_governors(root: str = CPU_ROOT) -> dict[int, str]:
    """The cpufreq governor of each CPU that exposes one (``cpuN/cpufreq/scaling_governor``)."""
    out = {}
    for path in glob.glob(os.path.join(root, "cpu[0-9]*", "cpufreq", "scaling_governor")):
        cpu = os.path.basename(os.path.dirname(os.path.dirname(path)))
        try:
            with open(path, encoding="ascii") as f:
                out[int(cpu[3:])] = f.read().strip()
        except (OSError, ValueError):
            continue
    return dict(sorted(out.items()))


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class DeviceSetting:
    """The power/performance setting a profile was measured under.

    Args:
        name: the key profiles are stored under: the nvpmodel mode name on a Jetson
            (``"15W"``), else ``cpu-{threads}t[-{governor}]`` (``"cpu-4t-performance"``).
        kind: ``"nvpmodel"`` or ``"cpu"``.
        threads: CPU threads the runtime uses.
        governors: the distinct cpufreq governors of the CPUs (empty when not exposed).
        mode: the nvpmodel mode, on a Jetson.
    """

    name: str
    kind: str
    threads: int
    governors: tuple[str, ...] = ()
    mode: PowerMode | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "threads": self.threads,
            "governors": list(self.governors),
            "mode": None if self.mode is None else {"id": self.mode.id, "name": self.mode.name},
        }


def current_setting(
    threads: int | None = None, nvpmodel: Nvpmodel | None = None, cpu_root: str = CPU_ROOT
) -> DeviceSetting:
    """The setting this device runs under now.

    Args:
        threads: CPU threads the runtime will use (default: the runtime's default, one).
        nvpmodel: where to read the Jetson mode; default :class:`Nvpmodel` if
            ``/etc/nvpmodel.conf`` exists. Without a mode the CPU setting is returned.
        cpu_root: the sysfs CPU directory (tests pass a fake tree).
    """
    if threads is None:
        threads = 1  # the runtime's default thread count (kdedge.targets.threads.default_threads)
    n = threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    governors = tuple(sorted(set(cpu_governors(cpu_root).values())))
    if nvpmodel is None and os.path.exists(NVPMODEL_CONF):
        # the one arrow up from this module: reading the mode needs the nvpmodel tool's parser,
        # which lives with the code that switches modes (kdedge.profile.modes); only on a Jetson
        from kdedge.profile.modes import Nvpmodel

        nvpmodel = Nvpmodel()
    if nvpmodel is not None:
        mode = nvpmodel.current_mode()
        return DeviceSetting(slug(mode.name, lower=False), "nvpmodel", n, governors, mode)
    name = f"cpu-{n}t" + (f"-{'+'.join(governors)}" if governors else "")
    return DeviceSetting(slug(name), "cpu", n, governors)


# -- device id -----------------------------------------------------------------------------------


def slug(text: str, lower: bool = True, max_len: int = 80) -> str:
    """A short filesystem-safe form of ``text``: letters, digits, ``.``, ``_``, ``+``, ``-``.

    Example:
        >>> slug("Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz")
        'intel-core-i7-8650u-cpu-1.90ghz'
    """
    s = re.sub(r"\((r|tm|c)\)|[®™]", "", text, flags=re.I)
    s = re.sub(r"[^A-Za-z0-9._+]+", "-", s).strip("-._+")
    if lower:
        s = s.lower()
    if len(s) > max_len:
        digest = hashlib.sha1(s.encode()).hexdigest()[:8]
        s = s[: max_len - 9].rstrip("-._") + "-" + digest
    return s or "unknown"


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\x00", b"").decode("utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _cpu_model(cpuinfo: str) -> str | None:
    text = _read_text(cpuinfo)
    if not text:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "model", "cpu model", "processor"):
        value = fields.get(key)
        if value and not value.isdigit():
            return value
    return None


def cpu_model(cpuinfo: str = CPUINFO) -> str:
    """The CPU's model name as the OS reports it (``Intel(R) Xeon(R) Processor``; on ARM the
    ``Hardware`` or ``model`` line), else what ``platform`` knows, else ``cpu``."""
    return _cpu_model(cpuinfo) or platform.processor() or platform.machine() or "cpu"


def _gpu_names(nvml: Any = None) -> list[str]:
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-not-found]

            nvml.nvmlInit()
        except Exception:  # no bindings or no driver: the id simply has no GPU part
            return []
    try:
        names = []
        for i in range(nvml.nvmlDeviceGetCount()):
            name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception:
        return []


def device_id(
    model_path: str = DEVICE_TREE_MODEL,
    cpuinfo: str = CPUINFO,
    include_gpu: bool = True,
    nvml: Any = None,
) -> str:
    """A short, stable, filesystem-safe id of this device, to key latency profiles.

    The board model on a Jetson (or any device-tree board): ``nvidia-jetson-orin-nano-developer-kit``.
    Elsewhere the CPU model and logical core count, plus the NVIDIA GPU model(s) when NVML is
    available: ``amd-epyc-7r13-processor-16c+nvidia-h100-80gb-hbm3``.

    Args:
        model_path: the device-tree model file.
        cpuinfo: the cpuinfo file.
        include_gpu: add the GPU part when NVML answers.
        nvml: an initialised pynvml-like module (tests pass a fake).
    """
    board = _read_text(model_path)
    if board:
        return slug(board)
    cpu = cpu_model(cpuinfo)
    ident = slug(f"{cpu}-{os.cpu_count() or 1}c", max_len=60)
    if include_gpu:
        gpus = _gpu_names(nvml)
        if gpus:
            distinct = sorted(set(gpus))
            gpu = "+".join((f"{gpus.count(g)}x-" if gpus.count(g) > 1 else "") + g for g in distinct)
            ident += "+" + slug(gpu, max_len=60)
    return ident
