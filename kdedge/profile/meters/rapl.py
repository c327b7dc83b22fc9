"""x86 CPU energy counters: Intel/AMD RAPL through powercap, and AMD's ``amd_energy`` hwmon.

powercap layout (Linux ``intel_rapl`` driver, also used for AMD Zen packages since Linux 5.8):

    /sys/class/powercap/intel-rapl:0/name                  "package-0"
    /sys/class/powercap/intel-rapl:0/energy_uj             cumulative µJ, wraps to 0
    /sys/class/powercap/intel-rapl:0/max_energy_range_uj   the value at which it wraps
    /sys/class/powercap/intel-rapl:0:0/name                "core" (also "uncore", "dram")
    /sys/class/powercap/intel-rapl:1/name                  "psys" on some laptops

The total is package + DRAM energy (the package domain excludes DRAM; ``core`` and ``uncore``
are parts of the package, and ``psys`` covers the platform, so adding them would count twice).
Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694).

``amd_energy`` (out-of-tree hwmon driver): ``/sys/class/hwmon/hwmonK/name`` = ``amd_energy``,
``energyN_input`` (µJ, accumulated to 64 bits by the driver), ``energyN_label`` = ``Esocket0`` or
``Ecore000``; the total is the sum of the socket counters.
"""

from __future__ import annotations

import glob
import os

from kdedge.profile.meters.base import PowerError
from kdedge.profile.meters.counters import AttributeReader, CounterMeter, read_number

POWERCAP_ROOT = "/sys/class/powercap"
HWMON_ROOT = "/sys/class/hwmon"


def _zone_key(path: str, names: dict[str, str]) -> str:
    """``package-0`` for a top-level zone, ``package-0/core`` for a subzone."""
    zone = os.path.basename(path)  # intel-rapl:0 or intel-rapl:0:1
    parts = zone.split(":")
    name = names[path]
    if len(parts) > 2:
        parent = os.path.join(os.path.dirname(path), ":".join(parts[:2]))
        return f"{names.get(parent, parts[0] + ':' + parts[1])}/{name}"
    return name


class RaplMeter(CounterMeter):
    """CPU package (and DRAM) energy from RAPL counters, or ``amd_energy`` when that is what exists.

    Args:
        powercap_root: the powercap class directory (tests pass a fake tree).
        hwmon_root: the hwmon class directory, searched for ``amd_energy`` when powercap has no
            RAPL zones.
        guard_period_s: how often a running window re-reads the counters to catch wrap-arounds.

    Example:
        >>> with RaplMeter() as meter:
        ...     run_stage()
        >>> meter.reading.rails   # {'package-0': ..., 'package-0/core': ..., ...}
    """

    name = "rapl"

    def __init__(
        self, powercap_root: str = POWERCAP_ROOT, hwmon_root: str = HWMON_ROOT, guard_period_s: float = 1.0
    ) -> None:
        super().__init__(guard_period_s)
        self._readers: dict[str, AttributeReader] = {}
        self._wrap: dict[str, float | None] = {}
        self._total_keys: list[str] = []
        self.kind = ""
        zones = sorted(glob.glob(os.path.join(powercap_root, "intel-rapl:*")))
        try:
            if zones:
                self._open_powercap(zones)
            else:
                self._open_amd_energy(hwmon_root)
        except BaseException:
            self.close()
            raise
        if not self._readers:
            raise PowerError(
                f"no RAPL energy counters: nothing under {powercap_root}/intel-rapl:* and no amd_energy "
                f"sensor under {hwmon_root} (not an x86 machine, a VM that hides them, or the intel_rapl "
                "driver is not loaded: sudo modprobe intel_rapl_common)"
            )

    def _open_powercap(self, zones: list[str]) -> None:
        names = {}
        for z in zones:
            try:
                with open(os.path.join(z, "name"), encoding="ascii") as f:
                    names[z] = f.read().strip()
            except OSError:
                names[z] = os.path.basename(z)
        for z in zones:
            energy = os.path.join(z, "energy_uj")
            if not os.path.exists(energy):
                continue
            key = _zone_key(z, names)
            self._readers[key] = AttributeReader(energy)
            self._readers[key].read()  # fail now (permission) rather than at start()
            rng = os.path.join(z, "max_energy_range_uj")
            self._wrap[key] = read_number(rng) * 1e-6 if os.path.exists(rng) else None
        keys = list(self._readers)
        packages = [k for k in keys if "/" not in k and k.startswith("package")]
        dram = [k for k in keys if k.split("/")[-1] == "dram"]
        if packages:
            self._total_keys = packages + dram
            self._phrase = "total = " + " + ".join(self._total_keys)
        else:
            top = [k for k in keys if "/" not in k and k != "psys"] or [k for k in keys if "/" not in k]
            self._total_keys = top
            self._phrase = "total = " + " + ".join(top)
        self.kind = "powercap"

    def _open_amd_energy(self, hwmon_root: str) -> None:
        for d in sorted(glob.glob(os.path.join(hwmon_root, "hwmon*"))):
            try:
                with open(os.path.join(d, "name"), encoding="ascii") as f:
                    if f.read().strip() != "amd_energy":
                        continue
            except OSError:
                continue
            for inp in sorted(glob.glob(os.path.join(d, "energy*_input"))):
                n = os.path.basename(inp)[len("energy") : -len("_input")]
                label_path = os.path.join(d, f"energy{n}_label")
                try:
                    with open(label_path, encoding="ascii") as f:
                        key = f.read().strip()
                except OSError:
                    key = f"energy{n}"
                self._readers[key] = AttributeReader(inp)
                self._readers[key].read()
                self._wrap[key] = None  # the driver accumulates to 64 bits
        sockets = [k for k in self._readers if k.lower().startswith("esocket")]
        self._total_keys = sockets or list(self._readers)
        self._phrase = "total = " + " + ".join(self._total_keys)
        self.kind = "amd_energy"

    def _read_counters(self) -> dict[str, float]:
        return {key: reader.read() * 1e-6 for key, reader in self._readers.items()}

    def _ranges(self) -> dict[str, float | None]:
        return self._wrap

    def _totals(self, counters: dict[str, float]) -> tuple[float, str]:
        return sum(counters[k] for k in self._total_keys), self._phrase

    def probe(self) -> str:
        self._read_counters()
        return f"{self.kind}: {', '.join(self._readers)}; {self._phrase}"

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
