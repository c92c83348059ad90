"""The project's Python passes pyflakes: an undefined name is a crash waiting for its branch, an unused import dead code."""

from __future__ import annotations

import io
from pathlib import Path

from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


def _sources() -> list[Path]:
    """diffcli/, bench/ (not its scratch folder bench/work/, which holds other commits' worktrees) and tests/."""
    out = []
    for top in ("diffcli", "bench", "tests"):
        out += [f for f in sorted((ROOT / top).rglob("*.py")) if f.relative_to(ROOT).parts[:2] != ("bench", "work")]
    return out


def test_pyflakes_reports_nothing():
    found, errors = io.StringIO(), io.StringIO()
    reporter = Reporter(found, errors)
    files = _sources()
    assert len(files) > 100  # the walk found the project
    for f in files:
        checkPath(str(f), reporter)
    assert found.getvalue() + errors.getvalue() == ""


def test_pyflakes_would_catch_an_undefined_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return undefined_name\n")
    found = io.StringIO()
    assert checkPath(str(bad), Reporter(found, io.StringIO())) == 1 and "undefined name" in found.getvalue()
