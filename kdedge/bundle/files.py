"""Opening files a user hands us without hanging, and saying precisely what a bad path is.

Two rules of the runtime live here (stdlib only):

- only regular files are read. A FIFO blocks ``open()`` until a writer appears, and a device
  such as ``/dev/zero`` never ends, so :func:`open_regular` opens with ``O_NONBLOCK`` (which
  returns at once for a FIFO) and checks what it opened with ``fstat`` before reading a byte:
  there is no window between a check and the ``open`` in which the path could be swapped;
- a path that cannot be used is named with the real reason (:func:`describe_path`): "is a
  file, not a directory", "is a FIFO", "is a broken symbolic link", "x.npy is a file, so
  x.npy/y cannot exist", rather than a blanket "does not exist".
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from kdedge.bundle.errors import BundleError
from kdedge.io import sha256_stream

__all__ = ["NotRegularFile", "describe_path", "file_kind", "open_regular", "package_files", "path_bytes", "sha256_path"]


class NotRegularFile(OSError):
    """A path that exists but is not a regular file (a FIFO, a device, a socket, a directory)."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What ``mode`` (from ``stat``) is, in words: ``"a regular file"``, ``"a FIFO (named pipe)"``, …"""
    if stat.S_ISREG(mode):
        return "a regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a special file"


def describe_path(path: str | Path, what: str = "") -> str:
    """Why ``path`` is not there, in one phrase starting with the path (for a message).

    Args:
        path: a path that ``exists()`` says is missing (or that could not be opened).
        what: what the path was meant to be (``"bundle"``, ``"input"``), put in front of it.

    Example:
        >>> describe_path("x.npy/model.kdedge", "bundle")
        'bundle x.npy/model.kdedge cannot exist: x.npy is a file, not a directory'
    """
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    if p.is_symlink():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"{label} is a broken symbolic link (to {target})"
    for parent in p.parents:
        try:
            mode = os.stat(parent).st_mode
        except OSError:
            continue
        if not stat.S_ISDIR(mode):
            return f"{label} cannot exist: {parent} is {file_kind(mode)}, not a directory"
        break
    return f"{label} does not exist"


def open_regular(path: str | Path, what: str = "") -> BinaryIO:
    """Open ``path`` for binary reading if, and only if, it is a regular file (symbolic links
    are followed). Never blocks: a FIFO is opened non-blocking and refused.

    Raises:
        FileNotFoundError: nothing there (the message says why, see :func:`describe_path`).
        NotRegularFile: a FIFO, device, socket or directory (the message names the kind).
        PermissionError / OSError: as ``open``.
    """
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise FileNotFoundError(describe_path(p, what)) from None
    except NotADirectoryError:
        raise FileNotFoundError(describe_path(p, what)) from None
    except IsADirectoryError:  # Windows; POSIX opens a directory read-only and fstat says so below
        raise NotRegularFile(f"{label} is a directory, not a file") from None
    except OSError as e:  # ENXIO (a socket), EACCES, ELOOP ...
        raise OSError(f"cannot open {label}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{label} is {file_kind(mode)}, not a regular file; kdedge reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file never blocks; later reads behave as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------
# a bundle file's size and sha256 (files and package directories)


def package_files(path: str | Path) -> list[tuple[str, Path]]:
    """The regular files under directory ``path`` as ``(relative POSIX path, path)``, sorted by the
    relative path (code point order, which is also UTF-8 byte order).

    Symbolic links are refused, not followed: a package is checksummed as the bytes it holds, and
    a link could point at anything outside it. So are other special files, and names that are not
    UTF-8 or hold a newline (they would make the digest's lines ambiguous).

    Raises:
        BundleError: a symbolic link, special file or unusable name inside ``path``.
    """
    root = Path(path)
    out: list[tuple[str, Path]] = []

    def fail(e: OSError) -> None:
        raise BundleError(f"cannot read {e.filename}: {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        for name in (*dirnames, *filenames):  # a link to a directory is listed in dirnames, never entered
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise BundleError(f"{root}: the name {rel!r} is not UTF-8; a package must hold UTF-8 names") from None
            if "\n" in rel:
                raise BundleError(f"{root}: the name {rel!r} holds a newline; a package cannot be checksummed with it")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{root} holds a symbolic link {rel!r}; a package directory must hold regular files "
                                  "only (links are not followed), re-export the bundle")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"{root} holds {rel!r}, which is not a regular file; re-export the bundle")
            out.append((rel, full))
    out.sort(key=lambda t: t[0])
    return out


def sha256_path(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file; of a directory (e.g. a CoreML ``.mlpackage``): the sha256 of
    the UTF-8 lines ``"<relative posix path>\\0<sha256 hex of that file>\\n"`` over its regular
    files, sorted by path (:func:`package_files`; empty directories do not count, symbolic links
    are refused).

    Raises:
        BundleError: a directory holding a symbolic link or a special file.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for rel, f in package_files(path):
            h.update(f"{rel}\0{sha256_path(f, chunk)}\n".encode())
        return h.hexdigest()
    try:
        fh = open_regular(path)  # a FIFO or device inside a bundle must not hang the check
    except NotRegularFile as e:
        raise BundleError(str(e)) from None
    with fh:
        return sha256_stream(fh, chunk)


def path_bytes(path: str | Path) -> int:
    """Size in bytes of a file, or the total size of the regular files of a directory
    (:func:`package_files`: symbolic links are refused)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for _, f in package_files(path))
    return path.stat().st_size

