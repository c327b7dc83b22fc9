"""Device power settings: Jetson ``nvpmodel`` modes by name, ``jetson_clocks``, CPU settings, device id.

Latency and energy profiles are keyed by *device* (:func:`device_id`) and *setting*
(:func:`current_setting`): on a Jetson the setting is the nvpmodel mode's name; elsewhere it is
the CPU thread count and frequency governor, e.g. ``cpu-4t-performance``.

nvpmodel modes are chosen by NAME: the ids in ``/etc/nvpmodel.conf`` differ by board and
JetPack (``nvpmodel -m 0`` is MAXN on an AGX Orin but 15W on an Orin Nano). Switching modes
needs root; :meth:`Nvpmodel.power_mode` and :meth:`Nvpmodel.sweep` always put the user's mode
(and clocks) back, also after an exception or Ctrl-C.

Example:
    >>> nv = Nvpmodel()
    >>> nv.modes                       # {'15W': PowerMode(id=0, name='15W'), ...}
    >>> with nv.sweep(["15W", "MAXN_SUPER"]) as modes:
    ...     for mode in modes:
    ...         measure(mode.name)
    >>> nv.current_mode()             # the mode the user had before
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

from kdedge.profile.power import PowerError, PowerPermissionError


NVPMODEL_CONF = "/etc/nvpmodel.conf"  # also kdedge.device.NVPMODEL_CONF (read there: is this a Jetson?)
#: nvpmodel records the active mode here ("pmode:0002"); read when ``nvpmodel -q`` fails.
NVPMODEL_STATUS = "/var/lib/nvpmodel/status"

__all__ = [
    "ModeError",
    "Nvpmodel",
    "PowerMode",
    "read_nvpmodel_conf",
]


class ModeError(PowerError):
    """A power mode cannot be read, found or set."""


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel mode: its id on this board and its name."""

    id: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} (id {self.id})"


_TAG_RE = re.compile(r"^\s*<\s*(POWER_MODEL|PM_CONFIG)\b([^>]*)>")
_ATTR_RE = re.compile(r"(\w+)\s*=\s*([^\s>]+)")


def read_nvpmodel_conf(path: str = NVPMODEL_CONF) -> tuple[dict[str, PowerMode], int | None]:
    """The modes an nvpmodel configuration defines, by name, and the default mode's id.

    Reads the ``< POWER_MODEL ID=n NAME=s >`` and ``< PM_CONFIG DEFAULT=n >`` tags (attributes in
    any order; ``#`` comments ignored).

    Raises:
        ModeError: the file is missing or unreadable, defines no mode, or repeats a name or id.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ModeError(f"no nvpmodel configuration at {path}: not a Jetson (or pass the path of its .conf)") from None
    except PermissionError:
        raise PowerPermissionError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise ModeError(f"cannot read {path}: {err.strerror or err}") from None
    modes: dict[str, PowerMode] = {}
    default: int | None = None
    for lineno, line in enumerate(lines, 1):
        m = _TAG_RE.match(line.split("#", 1)[0])
        if not m:
            continue
        attrs = {k.upper(): v for k, v in _ATTR_RE.findall(m.group(2))}
        if m.group(1) == "PM_CONFIG":
            if "DEFAULT" in attrs and attrs["DEFAULT"].isdigit():
                default = int(attrs["DEFAULT"])
            continue
        if "ID" not in attrs or "NAME" not in attrs or not attrs["ID"].isdigit():
            raise ModeError(f"{path}:{lineno}: POWER_MODEL without a numeric ID and a NAME: {line.strip()!r}")
        mode = PowerMode(int(attrs["ID"]), attrs["NAME"])
        if mode.name in modes:
            raise ModeError(f"{path}:{lineno}: mode name {mode.name!r} defined twice")
        if any(other.id == mode.id for other in modes.values()):
            raise ModeError(f"{path}:{lineno}: mode id {mode.id} defined twice")
        modes[mode.name] = mode
    if not modes:
        raise ModeError(f"{path} defines no POWER_MODEL: is it an nvpmodel configuration?")
    return modes, default


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C while the user's settings are put back; re-raise it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Nvpmodel:
    """Jetson power modes and clocks, through the ``nvpmodel`` and ``jetson_clocks`` tools.

    Args:
        conf: the nvpmodel configuration (``/etc/nvpmodel.conf``).
        nvpmodel: the nvpmodel executable (tests pass a fake that records its calls).
        jetson_clocks: the jetson_clocks executable; ``None`` to leave clocks alone.
        status: nvpmodel's status file, read when ``nvpmodel -q`` fails.
        sudo: run the tools through ``sudo -n`` (for a user with a sudoers rule for them)
            instead of requiring this process to be root.
        timeout_s: limit for one tool call.
    """

    def __init__(
        self,
        conf: str = NVPMODEL_CONF,
        nvpmodel: str = "nvpmodel",
        jetson_clocks: str | None = "jetson_clocks",
        status: str = NVPMODEL_STATUS,
        sudo: bool = False,
        timeout_s: float = 120.0,
    ) -> None:
        self.conf = conf
        self.nvpmodel = nvpmodel
        self.jetson_clocks = jetson_clocks
        self.status = status
        self.sudo = sudo
        self.timeout_s = timeout_s
        self._modes: dict[str, PowerMode] | None = None
        self._default: int | None = None

    # -- reading -------------------------------------------------------------------------------
    @property
    def modes(self) -> dict[str, PowerMode]:
        """The modes of this board by name (from :attr:`conf`)."""
        if self._modes is None:
            self._modes, self._default = read_nvpmodel_conf(self.conf)
        return dict(self._modes)

    @property
    def default_mode(self) -> PowerMode | None:
        modes = self.modes
        return next((m for m in modes.values() if m.id == self._default), None)

    def _known(self) -> str:
        return ", ".join(str(m) for m in sorted(self.modes.values(), key=lambda m: m.id))

    def resolve(self, mode: str | int | PowerMode) -> PowerMode:
        """The mode called ``mode`` on this board.

        Names match exactly, then case-insensitively, then without a ``MODE_`` prefix
        (``"15W"`` finds ``MODE_15W``). An int or a digit string is an id.

        Raises:
            ModeError: no such mode; the message lists this board's modes.
        """
        modes = self.modes
        if isinstance(mode, PowerMode):
            mode = mode.name
        if isinstance(mode, int) or (isinstance(mode, str) and mode.isdigit()):
            for m in modes.values():
                if m.id == int(mode):
                    return m
            raise ModeError(f"no power mode with id {mode} on this board; known modes: {self._known()}")
        if mode in modes:
            return modes[mode]

        def norm(s: str) -> str:
            s = s.upper()
            return s[len("MODE_") :] if s.startswith("MODE_") else s

        matches = [m for m in modes.values() if norm(m.name) == norm(mode)]
        if len(matches) == 1:
            return matches[0]
        raise ModeError(f"unknown power mode {mode!r}; known modes on this board: {self._known()}")

    def _cmd(self, exe: str, *args: str) -> list[str]:
        return (["sudo", "-n"] if self.sudo else []) + [exe, *args]

    def _run(self, exe: str, *args: str, what: str) -> str:
        cmd = self._cmd(exe, *args)
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except FileNotFoundError:
            raise ModeError(
                f"{cmd[0]} not found: {what} needs {os.path.basename(exe)}, which ships with JetPack "
                "(/usr/sbin or /usr/bin); pass its path"
            ) from None
        except PermissionError:
            raise PowerPermissionError(f"cannot run {cmd[0]}: permission denied") from None
        except subprocess.TimeoutExpired:
            raise ModeError(f"{' '.join(cmd)} did not finish within {self.timeout_s:.0f} s") from None
        out = (proc.stdout or "") + (proc.stderr or "")
        failed = proc.returncode != 0 or "NVPM ERROR" in out
        if failed:
            last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()), "no output")
            if re.search(r"permission denied|as root|must be root|not permitted|a password is required", out, re.I):
                raise PowerPermissionError(
                    f"{what} needs root: {' '.join(cmd)} said {last!r}; run kdedge with sudo, "
                    "or pass sudo=True with a sudoers rule for the tool"
                )
            raise ModeError(f"{' '.join(cmd)} failed (status {proc.returncode}): {last}")
        return out

    def _require_root(self, what: str) -> None:
        if not self.sudo and hasattr(os, "geteuid") and os.geteuid() != 0:
            raise PowerPermissionError(
                f"{what} needs root: run kdedge with sudo (e.g. sudo -E kdedge profile ...), "
                "or pass sudo=True with a sudoers rule for nvpmodel and jetson_clocks"
            )

    def current_mode(self) -> PowerMode:
        """The active mode, from ``nvpmodel -q`` (or nvpmodel's status file if that fails)."""
        modes = self.modes
        try:
            out = self._run(self.nvpmodel, "-q", what="reading the power mode")
        except ModeError as err:
            mode = self._mode_from_status()
            if mode is None:
                raise err
            return mode
        lines = [ln.strip() for ln in out.splitlines()]
        for i, line in enumerate(lines):
            m = re.match(r"NV Power Mode:\s*(\S+)", line)
            if m:
                name = m.group(1)
                if i + 1 < len(lines) and lines[i + 1].isdigit():
                    mid = int(lines[i + 1])
                    for mode in modes.values():
                        if mode.id == mid:
                            return mode
                if name in modes:
                    return modes[name]
                raise ModeError(f"nvpmodel reports mode {name!r}, which {self.conf} does not define: {self._known()}")
        raise ModeError(f"cannot read the power mode from nvpmodel -q output: {out.strip()[:200]!r}")

    def _mode_from_status(self) -> PowerMode | None:
        try:
            with open(self.status, encoding="ascii") as f:
                m = re.search(r"pmode:(\d+)", f.read())
        except OSError:
            return None
        if not m:
            return None
        try:
            return self.resolve(int(m.group(1)))
        except ModeError:
            return None

    # -- changing ------------------------------------------------------------------------------
    def set_mode(self, mode: str | int | PowerMode) -> PowerMode:
        """Switch to ``mode`` (by name) with ``nvpmodel -m ID`` and check that it took.

        Raises:
            PowerPermissionError: not root.
            ModeError: unknown mode (lists the known ones), or nvpmodel did not switch (some
                switches need a reboot; nvpmodel's own words are quoted).
        """
        target = self.resolve(mode)
        self._require_root(f"setting the power mode to {target.name}")
        out = self._run(self.nvpmodel, "-m", str(target.id), what=f"setting the power mode to {target.name}")
        now = self.current_mode()
        if now != target:
            said = " ".join(ln.strip() for ln in out.splitlines() if ln.strip())[:200]
            raise ModeError(
                f"nvpmodel did not switch to {target} (still {now}); this switch may need a reboot "
                f"on this board. nvpmodel said: {said or 'nothing'}"
            )
        return target

    def _clocks_exe(self) -> str | None:
        if self.jetson_clocks is None:
            return None
        return shutil.which(self.jetson_clocks)

    def store_clocks(self, path: str) -> None:
        """``jetson_clocks --store PATH``: save the current clock settings."""
        exe = self._require_clocks()
        self._require_root("storing the clocks")
        self._run(exe, "--store", path, what="storing the clocks")

    def restore_clocks(self, path: str) -> None:
        """``jetson_clocks --restore PATH``: put saved clock settings back."""
        exe = self._require_clocks()
        self._require_root("restoring the clocks")
        self._run(exe, "--restore", path, what="restoring the clocks")

    def max_clocks(self) -> None:
        """``jetson_clocks``: pin CPU, GPU and memory clocks at the current mode's maximum."""
        exe = self._require_clocks()
        self._require_root("pinning the clocks")
        self._run(exe, what="pinning the clocks")

    def _require_clocks(self) -> str:
        exe = self._clocks_exe()
        if exe is None:
            raise ModeError(
                f"jetson_clocks not found ({self.jetson_clocks!r}): it ships with JetPack (/usr/bin/jetson_clocks)"
            )
        return exe

    def _save_user_state(self) -> tuple[PowerMode, str | None]:
        original = self.current_mode()
        store = None
        if self._clocks_exe() is not None:
            fd, store = tempfile.mkstemp(prefix="kdedge-clocks-", suffix=".conf")
            os.close(fd)
            try:
                self.store_clocks(store)
            except BaseException:
                os.unlink(store)
                raise
        return original, store

    def _restore_user_state(self, original: PowerMode, store: str | None) -> None:
        with _sigint_deferred():
            problems = []
            try:
                if self.current_mode() != original:
                    self.set_mode(original)
            except Exception as err:
                problems.append(str(err))
            if store is not None:
                try:
                    self.restore_clocks(store)
                except Exception as err:
                    problems.append(str(err))
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(store)
            if problems:
                raise ModeError(
                    f"could not restore your power mode {original}: {'; '.join(problems)}. "
                    f"Restore it by hand: sudo {self.nvpmodel} -m {original.id}"
                )

    @contextlib.contextmanager
    def power_mode(self, mode: str | int | PowerMode, lock_clocks: bool = False) -> Iterator[PowerMode]:
        """Run a block in ``mode``; the user's mode and clocks are restored afterwards, always.

        Args:
            mode: mode name (or id).
            lock_clocks: also run ``jetson_clocks`` in the mode (stable clocks for profiling).

        Example:
            >>> with Nvpmodel().power_mode("15W") as mode:
            ...     profile(mode.name)
        """
        with self.sweep([mode], lock_clocks=lock_clocks) as modes:
            for m in modes:
                yield m

    @contextlib.contextmanager
    def sweep(self, modes: Sequence[str | int | PowerMode], lock_clocks: bool = False) -> Iterator[Iterator[PowerMode]]:
        """Visit several modes in turn; the user's mode and clocks are restored at the end.

        Every name is checked before anything changes. The user's clocks are saved with
        ``jetson_clocks --store`` (when jetson_clocks exists) and put back after the mode, so a
        user who had run ``jetson_clocks`` gets pinned clocks back too. Restoration happens on
        normal exit, on an exception and on Ctrl-C (a second Ctrl-C during restoration is held
        until it is done).

        Example:
            >>> with nv.sweep(["15W", "25W", "MAXN_SUPER"]) as it:
            ...     for mode in it:
            ...         profile(mode.name)
        """
        targets = [self.resolve(m) for m in modes]
        if not targets:
            raise ModeError("sweep needs at least one power mode")
        if lock_clocks:
            self._require_clocks()
        self._require_root("switching power modes")
        original, store = self._save_user_state()

        def visit() -> Iterator[PowerMode]:
            for target in targets:
                if self.current_mode() != target:
                    self.set_mode(target)
                if lock_clocks:
                    self.max_clocks()
                yield target

        try:
            yield visit()
        finally:
            self._restore_user_state(original, store)
