"""Jetson power meters: INA3221 rails from sysfs, ``tegrastats``, and ``jtop``.

Sysfs layouts of the on-module INA3221 monitors (three channels each; a board has one or two):

- JetPack 5, 6, 7 (the mainline ``ina3221`` hwmon driver):
  ``/sys/bus/i2c/devices/1-0040/hwmon/hwmonK/inN_label`` (rail name),
  ``inN_input`` (bus voltage, mV), ``currN_input`` (current, mA), N = 1..3. Channels labelled
  ``NC`` are not connected; ``in7`` is the sum of shunt voltages, not a rail.
- JetPack 4 and older (the ``ina3221x`` IIO driver):
  ``/sys/bus/i2c/devices/6-0040/iio:device0/rail_name_N``, ``in_voltageN_input`` (mV),
  ``in_currentN_input`` (mA), ``in_powerN_input`` (mW, preferred when present), N = 0..2.

Rail names differ by board: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC (Orin Nano / NX); VDD_GPU_SOC,
VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO (AGX Orin, which has no input rail, so the total is the
sum); POM_5V_IN, POM_5V_GPU, POM_5V_CPU (Nano). See :data:`~kdedge.profile.meters.base.INPUT_RAILS`.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import threading
from typing import Any, Callable

import kdedge.profile.tegrastats as _tegrastats
from kdedge.profile.meters.base import (
    DEFAULT_PERIOD_S,
    PollingMeter,
    PowerError,
    StreamMeter,
    clock,
)
from kdedge.profile.meters.counters import AttributeReader

SYSFS_I2C_ROOT = "/sys/bus/i2c/devices"


class _Rail:
    """How to read one rail: volts x amps, or a power attribute in milliwatts."""

    def __init__(self, name: str, volt: str | None = None, curr: str | None = None, power_mw: str | None = None):
        self.name = name
        self.paths = [p for p in (volt, curr, power_mw) if p]
        self._power = AttributeReader(power_mw) if power_mw else None
        self._volt = AttributeReader(volt) if volt and curr and not power_mw else None
        self._curr = AttributeReader(curr) if volt and curr and not power_mw else None

    def watts(self) -> float:
        if self._power is not None:
            return self._power.read() * 1e-3
        return self._volt.read() * self._curr.read() * 1e-6  # mV * mA = µW

    def close(self) -> None:
        for reader in (self._volt, self._curr, self._power):
            if reader is not None:
                reader.close()


def _read_label(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def find_rails(root: str = SYSFS_I2C_ROOT) -> list[tuple[str, dict[str, str]]]:
    """Discover INA3221 rails under ``root`` (both sysfs layouts).

    Returns:
        ``(rail name, {"volt": path, "curr": path} or {"power_mw": path})`` per connected rail,
        sorted by name.
    """
    found: dict[str, dict[str, str]] = {}
    seen_dirs: set[str] = set()
    candidates = sorted(
        glob.glob(os.path.join(root, "*", "hwmon", "hwmon*"))
        + glob.glob(os.path.join(root, "*", "hwmon*"))
        + glob.glob(os.path.join(root, "*", "iio:device*"))
    )
    for d in candidates:
        real = os.path.realpath(d)
        if real in seen_dirs or not os.path.isdir(d):
            continue
        seen_dirs.add(real)
        # hwmon layout (JetPack 5+): inN_label, inN_input (mV), currN_input (mA)
        for label_path in sorted(glob.glob(os.path.join(d, "in*_label"))):
            n = os.path.basename(label_path)[2:].split("_", 1)[0]
            try:
                name = _read_label(label_path)
            except OSError:
                continue
            if not name or name.upper() == "NC" or "sum of shunt" in name.lower():
                continue
            volt, curr = os.path.join(d, f"in{n}_input"), os.path.join(d, f"curr{n}_input")
            if os.path.exists(volt) and os.path.exists(curr):
                found.setdefault(name, {"volt": volt, "curr": curr})
        # IIO layout (JetPack 4, ina3221x): rail_name_N, in_powerN_input (mW) or V and I
        for label_path in sorted(glob.glob(os.path.join(d, "rail_name_*"))):
            n = os.path.basename(label_path)[len("rail_name_") :]
            try:
                name = _read_label(label_path)
            except OSError:
                continue
            if not name or name.upper() == "NC":
                continue
            # The driver's own power attribute: one read per sample instead of two.
            power = os.path.join(d, f"in_power{n}_input")
            volt, curr = os.path.join(d, f"in_voltage{n}_input"), os.path.join(d, f"in_current{n}_input")
            if os.path.exists(power):
                found.setdefault(name, {"power_mw": power})
            elif os.path.exists(volt) and os.path.exists(curr):
                found.setdefault(name, {"volt": volt, "curr": curr})
    return sorted(found.items())


class JetsonSysfsMeter(PollingMeter):
    """Jetson INA3221 rails read from sysfs on a background thread.

    Args:
        root: the I2C devices directory (tests pass a fake tree).
        period_s: sampling period.
        total_rail: ``None`` (the input rail if the board has one, else the sum), ``"sum"`` or
            a rail name.

    Example:
        >>> with JetsonSysfsMeter() as meter:
        ...     run_stage()
        >>> meter.reading.rails["VDD_IN"]
    """

    name = "jetson-sysfs"

    def __init__(
        self, root: str = SYSFS_I2C_ROOT, period_s: float = DEFAULT_PERIOD_S, total_rail: str | None = None
    ) -> None:
        super().__init__(period_s, total_rail)
        self.root = root
        found = find_rails(root)
        if not found:
            raise PowerError(
                f"no INA3221 power rails under {root} (expected */hwmon/hwmon*/inN_label or "
                "*/iio:device*/rail_name_N): not a Jetson, or a board without on-module monitors"
            )
        self._rails = []
        try:
            for name, paths in found:
                self._rails.append(_Rail(name, paths.get("volt"), paths.get("curr"), paths.get("power_mw")))
        except BaseException:
            self.close()
            raise

    @property
    def rail_names(self) -> list[str]:
        return [r.name for r in self._rails]

    def _read(self) -> dict[str, float]:
        return {rail.name: rail.watts() for rail in self._rails}

    def close(self) -> None:
        for rail in getattr(self, "_rails", []):
            rail.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TegrastatsMeter(StreamMeter):
    """Jetson rails read from a ``tegrastats --interval MS`` subprocess.

    ``tegrastats`` runs on a pseudo-terminal so that it flushes every line (through a pipe, a C
    program's output is block-buffered and lines would arrive late, in bursts, with wrong
    timestamps). Each line is stamped when it arrives.

    Args:
        executable: the tegrastats program (tests pass a fake script).
        period_s: tegrastats interval (rounded to whole milliseconds).
        total_rail: see :class:`JetsonSysfsMeter`.
        use_pty: run on a pseudo-terminal (POSIX); otherwise a pipe.
        wait_for_edge: ``stop()`` waits for the first line after the stop time.

    Example:
        >>> meter = TegrastatsMeter(period_s=0.05)
        >>> with meter.session():              # keep tegrastats running across windows
        ...     for stage in stages:
        ...         with meter:
        ...             stage.run()
        ...         print(meter.reading)
    """

    name = "tegrastats"

    def __init__(
        self,
        executable: str = "tegrastats",
        period_s: float = 0.1,
        total_rail: str | None = None,
        use_pty: bool = True,
        wait_for_edge: bool = True,
    ) -> None:
        super().__init__(period_s, total_rail, wait_for_edge)
        self.interval_ms = max(1, round(self.period_s * 1e3))
        self.period_s = self.interval_ms * 1e-3
        found = shutil.which(executable)
        if found is None:
            raise PowerError(
                f"tegrastats not found ({executable!r}): it ships with JetPack as /usr/bin/tegrastats; "
                "pass the path of the executable"
            )
        self.executable = found
        self.use_pty = use_pty and os.name == "posix"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def _open_stream(self) -> None:
        cmd = [self.executable, "--interval", str(self.interval_ms)]
        try:
            if self.use_pty:
                import pty

                master, slave = pty.openpty()
                try:
                    self._proc = subprocess.Popen(
                        cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, close_fds=True
                    )
                finally:
                    os.close(slave)
                fd = master
            else:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                fd = self._proc.stdout.fileno()
        except PermissionError:
            raise PowerError(f"cannot run {self.executable}: permission denied") from None
        except OSError as err:
            raise PowerError(f"cannot run {self.executable}: {err.strerror or err}") from None
        self._fd_is_master = self.use_pty
        self._reader = threading.Thread(target=self._read_lines, args=(fd,), name="kdedge-tegrastats", daemon=True)
        self._reader.start()

    def _read_lines(self, fd: int) -> None:
        buf = b""
        try:
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO on a pty once the child has exited
                    chunk = b""
                now = clock()
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", errors="replace").strip("\r\n ")
                    if not line:
                        continue
                    sample = _tegrastats.parse_line(line)
                    self._add_sample(now, sample.watts())
            proc = self._proc
            if proc is not None and self._open:
                rc = proc.wait()
                err = proc.stderr.read().decode("utf-8", errors="replace").strip() if proc.stderr else ""
                raise PowerError(
                    f"tegrastats exited (status {rc}) while measuring" + (f": {err.splitlines()[-1]}" if err else "")
                )
        except BaseException as err:
            self._fail(err)
        finally:
            if self._fd_is_master:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _close_stream(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class JtopMeter(StreamMeter):
    """Jetson rails read through jetson-stats' ``jtop`` service (a client of /run/jtop.sock).

    Args:
        period_s: jtop update interval (jtop's own minimum applies).
        total_rail: see :class:`JetsonSysfsMeter`.
        jtop_factory: callable ``(interval=...) -> client``; default ``jtop.jtop`` (tests pass a
            fake).
    """

    name = "jtop"

    def __init__(
        self,
        period_s: float = 0.5,
        total_rail: str | None = None,
        jtop_factory: Callable[..., Any] | None = None,
        wait_for_edge: bool = True,
    ) -> None:
        super().__init__(period_s, total_rail, wait_for_edge)
        if jtop_factory is None:
            try:
                from jtop import jtop as jtop_factory  # type: ignore[import-not-found]
            except ImportError:
                raise PowerError(
                    "the jtop meter needs jetson-stats: sudo pip3 install -U jetson-stats "
                    "(then log out and in so its jtop service runs)"
                ) from None
        self._factory = jtop_factory
        self._client: Any = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def rails_from_power(power: dict[str, Any]) -> dict[str, float]:
        """Watts per rail from jtop's ``power`` dict (milliwatts; the total rail sits in ``tot``)."""
        rails = {
            name: float(v["power"]) * 1e-3
            for name, v in power.get("rail", {}).items()
            if v.get("online", True) and "power" in v
        }
        tot = power.get("tot", {})
        # jtop moves the input rail (VDD_IN / POM_5V_IN) out of "rail" into "tot" with its name.
        if tot.get("name") and "power" in tot:
            rails[tot["name"]] = float(tot["power"]) * 1e-3
        return rails

    def _open_stream(self) -> None:
        try:
            self._client = self._factory(interval=self.period_s)
            self._client.start()
        except Exception as err:
            self._client = None
            raise PowerError(f"cannot connect to the jtop service: {err} (is jtop.service running?)") from None
        self._thread = threading.Thread(target=self._pump, name="kdedge-jtop", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            client = self._client
            while client is not None and client.ok():
                rails = self.rails_from_power(client.power)
                if rails:
                    self._add_sample(clock(), rails)
            if self._client is not None:  # not closed by us: the service went away
                raise PowerError("the jtop service stopped sending data (is jtop.service still running?)")
        except BaseException as err:
            self._fail(err)

    def _close_stream(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
