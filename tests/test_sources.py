"""The sources compile without warnings on every Python kdedge supports: Python 3.12 turned an
invalid escape sequence in a string (``\\ `` in a docstring) into a SyntaxWarning that every
import of the module printed on the GPU machine."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("kdedge", "tests", "bench", "scripts") for p in (ROOT / d).rglob("*.py"))


def test_every_source_compiles_without_a_warning() -> None:
    assert len(FILES) > 50
    noisy = []
    for path in FILES:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        noisy += [f"{path.relative_to(ROOT)}:{w.lineno}: {w.message}" for w in seen]
    assert noisy == []


def test_the_check_sees_an_invalid_escape() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compile('"""a :class:`X`\\ s"""\n', "<doc>", "exec")
    if not seen:
        pytest.fail("compile() reported no warning for an invalid escape sequence")
