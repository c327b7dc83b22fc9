"""What a run directory holds, and taking one for a run (``fit()``'s first and only writes
before training).

``inspect_run_dir`` classifies a path without writing anything, and ``plan_run`` decides:

- missing / empty (nothing, or only kdedge's lock and temp files): a new run;
- failed start (config.yaml, no checkpoint, no final record, only kdedge's own files: a run
  stopped during its first epoch by a kill, a NaN loss, ...): a plain rerun takes it over, with
  the same or another config; ``--resume`` with the same config starts it at epoch 1;
- unfinished (a checkpoint, no final record): ``--resume`` with the same config continues it;
- finished (run.json says so): refused;
- foreign or a file (files kdedge did not write, or not a directory): refused, naming them.

A failed start is taken over, not refused, because it holds nothing a run could continue: the
only record of the attempt is its config.yaml (and the metrics of an epoch that was never
checkpointed). Anything with a checkpoint is never overwritten. Validation happens before
:func:`claim_run_dir`, so bad input never gets that far; a kill can, and that is what the
takeover is for.

While a run trains, its directory is locked (``RUN/.lock``, ``flock``; released by the kernel
when the process dies, even by SIGKILL), so a second ``kdedge train`` on the same ``--out``
cannot take over a live run's first epoch.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdedge.io import atomic_write_text, read_json_strict
from kdedge.train.checkpoint import CHECKPOINT_FILE, POINTER, has_checkpoint

LOCK = ".lock"
# Names a run directory's top level may hold that kdedge wrote. eval-*.png: kdedge eval's plots.
OWN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints", "model.safetensors", "run.json", LOCK, ".write-test"}
_SCRATCH = {LOCK, ".write-test"}  # what a directory may hold and still count as empty
_OWN_PATTERN = re.compile(r"eval-[a-z]+\.png")
_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")  # kdedge.io.atomic_write's temporary files


class RunDirError(ValueError):
    """The output directory cannot take this run (holds another run, not writable, ...)."""


@dataclass
class RunDirState:
    """What a path holds, as far as training is concerned.

    Attributes:
        kind: ``missing`` | ``empty`` | ``file`` | ``foreign`` | ``failed_start`` | ``unfinished``
            | ``finished`` | ``damaged`` (a final record or weights without a checkpoint).
        strangers: names in it that kdedge did not write (first few).
        status: run.json's content when it is readable, else None.
    """

    path: Path
    kind: str
    strangers: list[str] = field(default_factory=list)
    status: dict[str, Any] | None = None


def _is_own(name: str, names: set[str] | None = None) -> bool:
    names = OWN_FILES if names is None else names
    m = _TEMP.fullmatch(name)
    return name in names or bool(_OWN_PATTERN.fullmatch(name)) or bool(m and m.group("name") in names)


def _own_checkpoint_name(name: str) -> bool:
    m = _TEMP.fullmatch(name)
    base = m.group("name") if m else name
    return base == POINTER or bool(CHECKPOINT_FILE.fullmatch(base))


def _strangers(run_dir: Path) -> list[str]:
    out = [p.name for p in run_dir.iterdir() if not _is_own(p.name)]
    ckdir = run_dir / "checkpoints"
    if ckdir.is_dir():
        out += [f"checkpoints/{p.name}" for p in ckdir.iterdir() if not _own_checkpoint_name(p.name)]
    elif ckdir.exists():
        out.append("checkpoints (not a directory)")
    return sorted(out)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """run.json as a dict; None when it is missing or damaged (a damaged one is not 'finished')."""
    try:
        status = read_json_strict(run_dir / "run.json")
    except (ValueError, OSError):
        return None
    return status if isinstance(status, dict) else None


def inspect_run_dir(path: str | Path) -> RunDirState:
    """Classify ``path`` (reads only)."""
    run_dir = Path(path)
    if not run_dir.exists():
        return RunDirState(run_dir, "missing")
    if not run_dir.is_dir():
        return RunDirState(run_dir, "file")
    strangers = _strangers(run_dir)
    status = read_status(run_dir)
    if not (run_dir / "config.yaml").is_file():
        leftovers = sorted(p.name for p in run_dir.iterdir() if p.name not in _SCRATCH and not _TEMP.fullmatch(p.name))
        return RunDirState(run_dir, "foreign", leftovers) if leftovers else RunDirState(run_dir, "empty")
    if status is not None and status.get("status") == "finished":
        return RunDirState(run_dir, "finished", strangers, status)
    if has_checkpoint(run_dir):
        return RunDirState(run_dir, "unfinished", strangers, status)
    if (run_dir / "run.json").exists() or (run_dir / "model.safetensors").exists():
        return RunDirState(run_dir, "damaged", strangers, status)
    return RunDirState(run_dir, "failed_start", strangers, status)


def _same_config(saved: str, new: str) -> bool:
    """The saved config.yaml describes the same run as ``new``: equal text, or equal once both are
    resolved (a config written before an option existed lacks it; its default applies)."""
    if saved == new:
        return True
    import yaml

    from kdedge.train.config import config_from_dict
    from kdedge.yaml_io import loads_yaml

    try:
        return config_from_dict(loads_yaml(saved)).to_dict() == config_from_dict(loads_yaml(new)).to_dict()
    except (ValueError, TypeError, AttributeError, yaml.YAMLError):  # an invalid saved config is another run
        return False


def _saved_config(run_dir: Path) -> str | None:
    """The text of ``run_dir/config.yaml``; None when it is not a readable, bounded text file."""
    from kdedge.yaml_io import read_text_file

    try:
        return read_text_file(run_dir / "config.yaml", "config.yaml")
    except ValueError:
        return None


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def plan_run(state: RunDirState, cfg_yaml: str, resume: bool) -> str:
    """What ``fit`` will do with the directory: ``new``, ``takeover`` (a failed start, cleared
    first) or ``resume``.

    Raises:
        RunDirError: the directory cannot take this run; the message says why and what to do.
    """
    d = state.path
    if state.kind == "file":
        raise RunDirError(f"--out {d} is a file, not a directory for a run; choose another --out")
    if state.kind == "missing":
        _check_creatable(d)
    if state.kind in ("missing", "empty"):
        if resume:
            raise RunDirError(f"--resume: {d} holds no run to resume; start it without --resume")
        return "new"
    if state.kind == "foreign":
        raise RunDirError(f"{d} is not empty and holds no kdedge run (it holds {_listed(state.strangers)}); "
                          f"choose another --out")
    saved = _saved_config(d)
    same = saved is not None and _same_config(saved, cfg_yaml)
    if state.kind == "failed_start":
        if state.strangers:
            raise RunDirError(f"{d} holds a run that stopped before its first checkpoint, and files kdedge did not "
                              f"write ({_listed(state.strangers)}); move them away or choose another --out")
        if resume and not same:
            raise RunDirError(f"--resume: {d} holds a run that stopped before its first checkpoint, with another "
                              f"config; rerun without --resume to start it over with this one")
        return "takeover"
    if not same:
        raise RunDirError(f"{d} already holds a different run (its config.yaml differs); "
                          f"choose another --out, or resume it with its own config")
    if state.kind == "finished":
        raise RunDirError(f"{d} holds a finished run; choose another --out")
    if state.kind == "damaged":
        raise RunDirError(f"{d} holds run.json or model.safetensors but no checkpoint: not a run kdedge can "
                          f"continue; choose another --out")
    if not resume:
        raise RunDirError(f"{d} holds an unfinished run; add --resume to continue it (or choose another --out)")
    return "resume"


def _check_creatable(run_dir: Path) -> None:
    """Name the culprit when ``run_dir`` cannot be created: a file where a parent should be."""
    parent = run_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"cannot create --out {run_dir}: {parent} is a file, not a directory")


class RunDirLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for as long as a run trains in the directory.

    The kernel drops the lock when the process exits, however it exits, so a killed run never
    leaves a stale lock. Where ``fcntl`` does not exist (Windows) this is a no-op.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise RunDirError(f"{self.run_dir} is in use by another kdedge train"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it or choose another --out")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _clear_failed_start(run_dir: Path) -> None:
    """Remove what a failed start left (its config, the metrics of an epoch never checkpointed,
    half-written checkpoint files). Only kdedge's own names are touched; plan_run has checked
    that nothing else is there."""
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.name == "checkpoints" and p.is_dir():
            shutil.rmtree(p)
        elif _is_own(p.name) and p.is_file():
            p.unlink()


def claim_run_dir(run_dir: Path, cfg_yaml: str, resume: bool) -> tuple[RunDirLock, str]:
    """Lock ``run_dir`` (creating it), decide again under the lock what to do, clear a failed
    start and write config.yaml. Call only after every input has been validated.

    Returns:
        The held lock (release it when the run ends) and the plan (``new``, ``takeover``, ``resume``).

    Raises:
        RunDirError: the directory cannot take the run (nothing was written then, except
            perhaps the directory itself and its lock file).
    """
    plan_run(inspect_run_dir(run_dir), cfg_yaml, resume)  # refuse before creating anything
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create --out {run_dir}: {e.strerror or e}") from None
    lock = RunDirLock(run_dir)
    try:
        lock.acquire()
    except OSError as e:
        raise RunDirError(f"cannot write to {run_dir}: {e.strerror or e}") from None
    try:
        plan = plan_run(inspect_run_dir(run_dir), cfg_yaml, resume)  # again: another process may have been faster
        if plan == "takeover":
            _clear_failed_start(run_dir)
        if plan != "resume":
            atomic_write_text(run_dir / "config.yaml", cfg_yaml)
    except OSError as e:
        lock.release()
        raise RunDirError(f"cannot write to {run_dir}: {e.strerror or e}") from None
    except BaseException:
        lock.release()
        raise
    return lock, plan
