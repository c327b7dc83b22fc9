"""Small file helpers shared by every layer (stdlib only): atomic writes, checksums and strict
JSON in both directions.

Strict JSON means what RFC 8259 allows and nothing more: no ``NaN``/``Infinity`` (Python's
``json`` reads and writes them by default), no duplicate keys (the last one silently wins in
Python), and, when reading files a user hands us, bounded size and nesting (a manifest nested
200,000 deep must be one line of error, not a ``RecursionError``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

MAX_JSON_BYTES = 64 << 20   # no manifest, profile or report comes near this
MAX_JSON_DEPTH = 64         # nor this: a manifest is ~6 levels deep


class JSONError(ValueError):
    """A JSON document that is not strict JSON or exceeds the bounds; the message names the file."""


def atomic_write(path: str | Path, write: Callable[[Path], None], *, keep_suffix: bool = False) -> Path:
    """Write a file atomically: ``write(tmp_path)`` fills a temp file in the same directory,
    which is fsynced and renamed over ``path``. A crash leaves the old file or none, never half.
    Temp names are unique, so writers in several processes never share one. ``keep_suffix``:
    the temp file ends with ``path``'s suffix too (for writers that check it, e.g. ``.pt2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + (path.suffix if keep_suffix else ""),
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps_strict(obj) + "\n")


def sha256_stream(fh: BinaryIO, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of what is left to read in the binary stream ``fh``."""
    h = hashlib.sha256()
    while block := fh.read(chunk):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of the file ``path`` (package directories: ``kdedge.bundle.files.sha256_path``)."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON's "no value"), recursively
    through dicts, lists and tuples. For output only: inputs with NaN are refused, not mapped."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if type(obj).__module__ == "numpy":  # numpy scalars (np.float32 is not a float)
        try:
            return finite_or_none(obj.item())
        except (AttributeError, ValueError):
            return obj
    return obj


def dumps_strict(obj: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """``json.dumps`` that never writes NaN or Infinity: non-finite floats become ``null``."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=default)


def _refuse_constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise JSONError(f"{text} overflows a double")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise JSONError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests lists/dicts deeper than ``limit``, without recursion."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return False


def loads_strict(text: str, *, what: str = "JSON", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse strict JSON (no NaN/Infinity, no duplicate keys, nesting at most ``max_depth``).

    Raises:
        JSONError: one line naming ``what`` and the problem.
    """
    deep = JSONError(f"{what} is nested deeper than {max_depth} levels; it is not a file kdedge wrote")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                         object_pairs_hook=_no_duplicates)
    except JSONError as e:
        raise JSONError(f"{what} is not strict JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise JSONError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # json's own limit, far above max_depth
        raise deep from None
    if _too_deep(obj, max_depth):  # later readers (the schema check) recurse per level
        raise deep
    return obj


def read_json_strict(path: str | Path, *, what: str | None = None, max_bytes: int = MAX_JSON_BYTES,
                     max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read a JSON file that a user may have edited or damaged: bounded size, strict JSON.

    Raises:
        JSONError: the file is too large, not UTF-8 or not strict JSON (the message names it).
        FileNotFoundError / IsADirectoryError: as ``open``.
    """
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        if path.exists():
            raise JSONError(f"{what} is not a regular file")
        raise FileNotFoundError(f"{what} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise JSONError(f"{what} is {size / 2**20:.0f} MiB, more than the {max_bytes >> 20} MiB a kdedge JSON file may be")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONError(f"{what} is not UTF-8 text (byte {e.start})") from None
    return loads_strict(text, what=what, max_depth=max_depth)
