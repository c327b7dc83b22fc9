"""Strict YAML in both directions, for recipes and a run's ``config.yaml``.

PyYAML's ``safe_load`` is safe from code execution but not from bad input: a duplicate key is
silently merged (the last one wins), an alias bomb ("billion laughs": nine anchors of nine
aliases each) expands to ~10^9 nodes the moment anything walks the tree, a document nested
100,000 deep ends in a ``RecursionError``, and opening a FIFO or ``/dev/zero`` blocks or never
ends. A recipe needs none of that, so this module refuses it with one line naming the line:

- only PyYAML's safe constructors (no tags at all, not even ``!!str``), with YAML 1.2's
  booleans (``true``/``false`` only; ``on``/``off``/``yes``/``no`` are strings) and exponent
  floats (``1e-3``),
- no anchors or aliases (``&a`` / ``*a``): write the value out,
- no duplicate keys,
- nesting at most ``MAX_YAML_DEPTH`` levels, files at most ``MAX_YAML_BYTES``, regular UTF-8
  text files only.

``dumps_yaml`` never writes aliases, so what kdedge writes, kdedge reads back.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode

MAX_YAML_BYTES = 1 << 20   # a recipe is a few KB; a run's config.yaml too
MAX_YAML_DEPTH = 32        # a recipe is ~4 levels deep


class YAMLRefused(yaml.YAMLError):
    """Well-formed YAML that kdedge refuses (alias, tag, duplicate key, too deep); carries the
    position like PyYAML's own errors (``problem``, ``problem_mark``)."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases, anchors, explicit tags, duplicate keys and deep nesting."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise YAMLRefused(f"aliases (*{event.anchor}) are not allowed; write the value out", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise YAMLRefused(f"anchors (&{event.anchor}) are not allowed; write the value out", event.start_mark)
        tag = getattr(event, "tag", None)
        explicit = tag is not None and (not event.implicit[0] if isinstance(event, ScalarEvent)
                                        else isinstance(event, CollectionStartEvent) and not event.implicit)
        if explicit:
            shown = "!!" + tag[len(_STANDARD):] if tag.startswith(_STANDARD) else tag
            raise YAMLRefused(f"tags ({shown}) are not allowed; write plain values", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLRefused(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # ``<<: {...}`` merges; the explicit keys still must be unique
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first_line:
                        raise YAMLRefused(f"duplicate key {key!r} (first at line {first_line[key]})",
                                          key_node.start_mark)
                    first_line[key] = key_node.start_mark.line + 1
                except TypeError:
                    continue  # an unhashable key: PyYAML's own check reports it
        return super().construct_mapping(node, deep=deep)


_STANDARD = "tag:yaml.org,2002:"
_MERGE = _STANDARD + "merge"

# Two YAML 1.1 readings that surprise users are replaced by YAML 1.2's: ``on``/``off``/``yes``/
# ``no`` are strings (``train.amp: off`` means "off", not false; booleans are true/false), and
# ``1e-3`` is a number, not the string "1e-3" (PyYAML's floats need a dot).
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _STANDARD + "bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(_STANDARD + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
StrictLoader.add_implicit_resolver(
    _STANDARD + "float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def yaml_error_text(e: yaml.YAMLError) -> str:
    """``" at line L, column C: problem"`` for any PyYAML (or :class:`YAMLRefused`) error."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{_where(e)}: {problem}"


def loads_yaml(text: str) -> Any:
    """Parse one YAML document strictly.

    Raises:
        yaml.YAMLError: malformed YAML, or :class:`YAMLRefused` for what kdedge does not accept.
    """
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_text_file(path: str | Path, what: str, *, max_bytes: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of a regular file, read without blocking and at most ``max_bytes`` long.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a
    FIFO, a device (``/dev/zero``) or a directory is refused instead of hanging or failing
    half-way, even if the path changes between the check and the read.

    Raises:
        ValueError: the path is missing, not a regular file, too large or not UTF-8 text; the
            message names ``what``.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{what} cannot be read (permission denied)") from None
    except OSError as e:
        raise ValueError(f"{what} cannot be opened: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ValueError(f"{what} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise ValueError(f"{what} is not a regular file (a pipe, device or socket); give a file path")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # the file object owns it now
            data = f.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{what} is larger than {max_bytes >> 10} KiB; a recipe is a few KB of text")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{what} holds binary data (a NUL byte at offset {nul}), not YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte {e.start}), not a YAML recipe") from None


def dumps_yaml(obj: Any) -> str:
    """``yaml.safe_dump`` without anchors/aliases (a value used twice is written twice), keys
    in insertion order, so :func:`loads_yaml` always reads it back."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> Any:
    """Quote a string that :class:`StrictLoader` would read as something else (``"1e-3"``);
    PyYAML's own rules quote only what YAML 1.1 would misread."""
    resolved = _RESOLVER.resolve(yaml.ScalarNode, data, (True, False))
    return dumper.represent_scalar(_STANDARD + "str", data, style="'" if resolved != _STANDARD + "str" else None)


_RESOLVER = StrictLoader("")
_NoAliasDumper.add_representer(str, _represent_str)
