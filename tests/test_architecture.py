"""The layering as built: no import circle, no arrow up except the listed one, and the table in
docs/architecture.md is the one the script prints (regenerate it when this fails)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_no_import_circle_and_no_unlisted_upward_arrow() -> None:
    res = run("--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "import circles: 0" in res.stdout


def test_the_architecture_page_shows_the_table_as_built() -> None:
    table = run("--table").stdout.strip()
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert table in page, ("docs/architecture.md's import table is out of date; replace it with the output of "
                           "`python scripts/import_graph.py --table`")


def test_the_checker_sees_a_circle(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import import_graph
    finally:
        sys.path.pop(0)
    assert import_graph.cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert import_graph.cycles({"a": {"b"}, "b": set()}) == []
