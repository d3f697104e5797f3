"""The results store: one JSON record per cell, written atomically, never overwritten.

``<root>/runs/<run_id>.json`` holds a cell's ``ok`` record; a failed attempt is kept as
``<run_id>.failed.<UTC time>.json`` so a later successful run does not erase what went wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write via a temporary file in the same folder, so readers never see half a file.

    With ``overwrite=False`` the final step is a hard link, which fails if the name exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.problems: list[str] = []  # files the last read skipped, each "path: reason"

    def ok_path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def has_ok(self, run_id: str) -> bool:
        return self.ok_path(run_id).exists()

    def write(self, record: dict[str, Any]) -> Path:
        run_id = record["run_id"]
        if record["status"] == "ok":
            path = self.ok_path(run_id)
        else:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            path = self.runs / f"{run_id}.failed.{stamp}.json"
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str), overwrite=False)
        return path

    def _read(self, path: Path) -> dict[str, Any] | None:
        """One record file, or None (noted in ``problems``) if it is unreadable or not a record."""
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = f"unreadable ({type(exc).__name__}: {exc})"
        else:
            if isinstance(rec, dict) and isinstance(rec.get("run_id"), str) and "status" in rec:
                return rec
            reason = "not a SlimBench record (no run_id/status)"
        self.problems.append(f"{path}: {reason}")
        warnings.warn(f"skipped {path}: {reason}", stacklevel=3)
        return None

    def history(self) -> list[dict[str, Any]]:
        """Every readable attempt, oldest file name first; unreadable files go to ``problems``."""
        self.problems = []
        out = []
        for p in sorted(self.runs.glob("*.json")):
            if not p.name.startswith(".") and (rec := self._read(p)) is not None:
                out.append(rec)
        return out

    def records(self, *, include_failed: bool = False) -> list[dict[str, Any]]:
        """The latest state of each cell, one record per run id (an ok record wins over failures)."""
        latest: dict[str, dict[str, Any]] = {}
        for rec in self.history():
            old = latest.get(rec["run_id"])
            if old is None or (
                old.get("status") != "ok"
                and (rec.get("status") == "ok" or rec.get("finished_at", "") >= old.get("finished_at", ""))
            ):
                latest[rec["run_id"]] = rec
        return [r for r in latest.values() if include_failed or r.get("status") == "ok"]
