"""The results store: one JSON record per cell, written atomically, never overwritten.

``<root>/runs/<run_id>.json`` holds a cell's ``ok`` record; a failed attempt is kept as
``<run_id>.failed.<UTC time>.json`` so a later successful run does not erase what went wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
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

    def records(self, *, include_failed: bool = False) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.runs.glob("*.json")):
            if p.name.startswith("."):
                continue
            rec = json.loads(p.read_text())
            if include_failed or rec.get("status") == "ok":
                out.append(rec)
        return out
