"""Docs, suites and every message the code can put into a record speak to a user: no issue
numbers of this project's tracker and no checks the user cannot see or run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACKER = re.compile(r"\bissues?\s*#?\d+\b|\bthe issue'?s\b|\b\w+'s issue\b|\(#\d+\)", re.IGNORECASE)


def texts():
    yield from (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml")))
    for folder in ("slimbench", "methods", "tasks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_tracker_references_in_docs_suites_or_code():
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in texts()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if TRACKER.search(line)
    ]
    assert hits == []
