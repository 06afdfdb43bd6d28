"""No file of the repository keeps a merge-conflict block (one reached docs/ once, unnoticed)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("hdrq_plugin", "export", "examples", "benchmarks", "tests", "docs")
SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".yml", ".yaml"}
_MARKER = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)


def conflict_lines(text: str) -> list[int]:
    """1-based line numbers of git's conflict markers in ``text``."""
    return [text.count("\n", 0, m.start()) + 1 for m in _MARKER.finditer(text)]


def _files():
    yield from (ROOT / name for name in ("README.md", "BENCHMARKS.md", "pyproject.toml", "Makefile"))
    for folder in SCANNED:
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file())


def test_no_file_holds_a_conflict_block():
    found = {str(p.relative_to(ROOT)): conflict_lines(p.read_text(errors="replace"))
             for p in _files() if p.exists()}
    assert not {p: lines for p, lines in found.items() if lines}


def test_the_scan_finds_a_conflict_block():
    block = "text\n<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> branch\n"
    assert conflict_lines(block) == [2, 4, 6]
    assert conflict_lines("Title\n========\n") == []  # a longer '=' rule is a Markdown heading
