"""kdedge.io: strict JSON in both directions and atomic writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from kdedge.io import JSONError, atomic_write_json, dumps_strict, loads_strict, read_json_strict


@pytest.mark.parametrize("text, needle", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('[1e400]', "1e400 overflows a double"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    ("[" * 200_000 + "]" * 200_000, "nested deeper than 64 levels"),
    ('{"a": ', "is not valid JSON (Expecting value at line 1 column 7)"),
])
def test_loads_strict_refuses_what_strict_json_does_not_allow(text: str, needle: str) -> None:
    with pytest.raises(JSONError) as e:
        loads_strict(text, what="m.json")
    assert str(e.value).startswith("m.json ") and needle in str(e.value) and "\n" not in str(e.value)


def test_loads_strict_reads_ordinary_json() -> None:
    doc = {"a": [1, 2.5, None, True, "x[{"], "b": {"c": -1e-300}}
    assert loads_strict(json.dumps(doc)) == doc
    deep = "[" * 64 + "]" * 64
    assert loads_strict(deep) == eval(deep)  # 64 levels is the bound, not beyond it


def test_read_json_strict_bounds_the_file(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 600 + "1]")
    with pytest.raises(JSONError, match="more than the 0 MiB"):
        read_json_strict(big, max_bytes=1000)
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(JSONError, match="not UTF-8 text"):
        read_json_strict(bad)
    with pytest.raises(JSONError, match="is not a regular file"):
        read_json_strict(tmp_path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(JSONError, match="is not a regular file"):  # refused without opening: no hang
        read_json_strict(fifo)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_json_strict(tmp_path / "none.json")


def test_output_is_strict_json() -> None:
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.0], "c": np.float32("nan"), "d": np.float64(2.0), "e": (1, 2)}
    text = dumps_strict(obj, indent=None)
    assert text == '{"a": null, "b": [null, null, 1.0], "c": null, "d": 2.0, "e": [1, 2]}'
    assert loads_strict(text)["d"] == 2.0


def test_atomic_write_json_writes_strict_json(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "sub" / "x.json", {"v": math.nan})
    assert path.read_text() == '{\n  "v": null\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp file left
