"""Writing a bundle: the manifest dict, provenance, and the atomic bundle directory.

A bundle is built in a hidden temporary directory next to its destination
(``.NAME.partial-PID-XXXX``), every file and directory is fsynced, and only then is it renamed
to its name, so an interrupted export leaves at most a hidden partial directory and never a
half bundle under the bundle's name; the next export to that name deletes partial directories
of dead processes. An existing bundle is replaced only with ``force=True``, and only once the
new one is complete: the two directories are swapped atomically (Linux), or the old one is
moved aside and put back if anything fails, then deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from kdedge.bundle.errors import ExportError
from kdedge.bundle.files import path_bytes, sha256_path
from kdedge.bundle.names import FORMAT, MANIFEST, SCHEMA_VERSION
from kdedge.bundle.validate import validate_manifest


def package_version(name: str) -> str | None:
    """The installed version; a module's own ``__version__`` when imported (it names the build, e.g. +cu130)."""
    mod = sys.modules.get(name)
    if isinstance(getattr(mod, "__version__", None), str):
        return str(mod.__version__)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def file_entry(root: Path, rel: str, **extra: Any) -> dict[str, Any]:
    """``{"path", "sha256", "bytes", **extra}`` of the file ``root/rel``."""
    full = root / rel
    return {"path": rel, "sha256": sha256_path(full), "bytes": path_bytes(full), **extra}


def provenance(*, opset: int | None, exporter: str | None, run_dir: str | None, config: dict[str, Any] | None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions of the tools that made the bundle, the training run and when."""
    from kdedge import __version__

    out = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kdedge": __version__,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
        "onnxscript": package_version("onnxscript"),
        "opset": opset,
        "exporter": exporter,
        "run_dir": run_dir,
        "config": config,
        "host": platform.platform(),
    }
    for k, v in (extra or {}).items():
        out.setdefault(k, v)
    return out


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{what} is not JSON-serialisable ({e}); pass plain dicts, lists, strings and numbers") from None


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_bundle_dir(path: Path) -> bool:
    """``path`` holds a kdedge manifest (of any schema version).

    Read strictly (bounded size and depth, regular files only): the path may be anything a user
    names with ``--out``, and a FIFO or a manifest nested 200,000 deep must not hang or crash
    the check that decides whether it may be replaced."""
    from kdedge.io import read_json_strict

    try:
        manifest = read_json_strict(path / MANIFEST)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing path without ``force``, and anything but a bundle or an empty directory with it."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"bundle path {out} exists; pass --force (force=True) to replace it, or choose another --out")
    if out.is_symlink() or not out.is_dir() or not (is_bundle_dir(out) or not any(out.iterdir())):
        raise ExportError(f"{out} exists and is not a kdedge bundle; refusing to replace it even with --force")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return bool(ok)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[Path]:
    """Sibling ``.NAME.<kind>-PID-XXXX`` directories whose process is gone."""
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}-*"):
        pid = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir():
            found.append(p)
    return found


def recover(out: Path) -> None:
    """Clean up after an export that was killed: put back a bundle that was moved aside while
    being replaced (only if nothing took its place), and delete partial bundles."""
    for old in _leftovers(out, "old"):
        if not out.exists() and is_bundle_dir(old):
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for partial in _leftovers(out, "partial"):
        shutil.rmtree(partial, ignore_errors=True)


class BundleDir:
    """The temporary directory a bundle is built in; :meth:`commit` puts it in place.

    Example:
        >>> with BundleDir("model.kdedge", force=False) as bd:
        ...     (bd.tmp / "onnx").mkdir(); ...
        ...     bd.commit(manifest)
    """

    def __init__(self, out: str | Path, force: bool) -> None:
        self.out = Path(out).absolute()
        self.force = force
        self.tmp = Path("")
        self.committed = False

    def __enter__(self) -> BundleDir:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        recover(self.out)
        check_destination(self.out, self.force)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_json(self, rel: str, obj: Any) -> None:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Validate and write the manifest, fsync everything, and put the bundle in place.

        A new path is one ``rename``. Replacing a bundle swaps the two directories in one
        atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old bundle is renamed
        aside first and put back if the second rename fails (and by :func:`recover` if the
        process dies in between).
        """
        manifest = _jsonable(manifest, "the manifest")
        try:
            validate_manifest(manifest, where="the new manifest")
        except ValueError as e:
            raise ExportError(f"internal error: the manifest being written is invalid: {e}") from None
        self.write_json(MANIFEST, manifest)  # written last: a directory without it is never a bundle
        _fsync_tree(self.tmp)
        check_destination(self.out, self.force)  # something may have appeared meanwhile
        old = None
        if self.out.exists():
            if _exchange(self.tmp, self.out):
                old = self.tmp  # after the swap, the temporary name holds the old bundle
                self.committed = True
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent))
                os.rmdir(old)
                os.rename(self.out, old)
        if not self.committed:
            try:
                os.rename(self.tmp, self.out)
            except OSError:
                if old is not None:
                    os.rename(old, self.out)
                raise
            self.committed = True
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def base_manifest() -> dict[str, Any]:
    from kdedge import __version__

    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kdedge_version": __version__}
