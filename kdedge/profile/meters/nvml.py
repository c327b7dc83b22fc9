"""NVIDIA GPU energy from NVML's total-energy counter.

``nvmlDeviceGetTotalEnergyConsumption`` returns the energy (mJ) the GPU has used since the
driver was loaded (Volta and newer). Differencing it gives the energy of a window without
sampling. NVML's *power* reading is not used: on recent GPUs it is a one-second average, so it
cannot resolve a stage that runs for milliseconds.

The counter is refreshed by the driver at its own rate, so a window much shorter than that
interval can read zero; profile a stage by running it many times inside one window.
"""

from __future__ import annotations

from typing import Any, Sequence

from kdedge.profile.meters.base import PowerError
from kdedge.profile.meters.counters import CounterMeter


def load_nvml() -> Any:
    """Import and initialise ``pynvml`` (from the ``nvidia-ml-py`` package)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        raise PowerError("the nvml meter needs NVIDIA's NVML bindings: pip install nvidia-ml-py") from None
    try:
        pynvml.nvmlInit()
    except Exception as err:
        raise PowerError(f"NVML did not initialise ({err}): no NVIDIA driver or GPU on this machine?") from None
    return pynvml


class NvmlMeter(CounterMeter):
    """Energy of NVIDIA GPUs from NVML's total-energy counter (joules per GPU, total = sum).

    Args:
        devices: GPU indices to measure; ``None`` measures every GPU.
        nvml: an initialised ``pynvml``-like module (tests pass a fake); default imports pynvml.
        guard_period_s: see :class:`~kdedge.profile.meters.base.CounterMeter`.

    Example:
        >>> with NvmlMeter(devices=[0]) as meter:
        ...     run_stage_many_times()
        >>> meter.reading.rails["gpu0"]
    """

    name = "nvml"

    def __init__(self, devices: Sequence[int] | None = None, nvml: Any = None, guard_period_s: float = 10.0) -> None:
        super().__init__(guard_period_s)
        self._nvml = nvml if nvml is not None else load_nvml()
        count = self._nvml.nvmlDeviceGetCount()
        if count == 0:
            raise PowerError("NVML sees no GPU")
        indices = list(range(count)) if devices is None else list(devices)
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise PowerError(f"GPU index {bad[0]} out of range: NVML sees {count} GPU(s), 0..{count - 1}")
        self._handles = {f"gpu{i}": self._nvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
        self.gpu_names = {}
        for key, handle in self._handles.items():
            name = self._nvml.nvmlDeviceGetName(handle)
            self.gpu_names[key] = name.decode() if isinstance(name, bytes) else str(name)
        self._read_counters()  # fails now on GPUs without the counter

    def _read_counters(self) -> dict[str, float]:
        out = {}
        for key, handle in self._handles.items():
            try:
                out[key] = self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle) * 1e-3
            except Exception as err:
                raise PowerError(
                    f"{key} ({self.gpu_names.get(key, '?')}) has no total-energy counter ({err}); "
                    "it needs a Volta or newer GPU"
                ) from None
        return out

    def probe(self) -> str:
        self._read_counters()
        return "total-energy counter on " + ", ".join(f"{k} ({v})" for k, v in self.gpu_names.items())
