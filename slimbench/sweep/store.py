"""The results store: one JSON record per cell, written atomically, never overwritten.

``<root>/runs/<run_id>.json`` holds a cell's ``ok`` record; a failed attempt is kept as
``<run_id>.failed.<UTC time>.json`` so a later successful run does not erase what went wrong.

Reading is defensive: a file that is not a record (truncated, unreadable, a foreign JSON
document) is skipped with one warning naming it, listed in ``ResultStore.problems``, and
never counts as done, so ``run`` computes its cell again. Writing is strict: records are
standard JSON (no ``NaN``/``Infinity``), written to a temporary file and linked into place.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slimbench.errors import SuiteError

STATUSES = ("ok", "failed")
# What a record must hold to be read as one (older records have all of these too).
RECORD_FIELDS: dict[str, type] = {"run_id": str, "status": str, "model": dict, "method": dict, "task": dict}
NESTED_NAMES = (("model", "name"), ("method", "name"), ("method", "label"), ("task", "name"))


def _tmp_prefix(name: str) -> str:
    # Host and pid in the name: a leftover of a killed writer can be told from a live one.
    return f".{name}.{socket.gethostname()}.{os.getpid()}."


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (single-threaded): mkstemp creates 0600 files, but records, reports and
# artifacts are meant to be shared like any file the user writes.
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_text(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write via a temporary file in the same folder, so readers never see half a file.

    With ``overwrite=False`` the final step is a hard link, which fails if the name exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- strict JSON ---------------------------------------------------------------------------
def replace_non_finite(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of ``obj`` with every NaN/inf float replaced by None, and where they were.

    JSON has no NaN or infinity; Python's ``json`` writes them as bare ``NaN``, which other
    readers reject. Callers decide what a non-finite value means (the runner fails a cell
    whose metric is one); this only keeps the file valid.
    """
    if isinstance(obj, float):
        return (obj, []) if math.isfinite(obj) else (None, [path or "."])
    if isinstance(obj, dict):
        out, where = {}, []
        for k, v in obj.items():
            out[k], w = replace_non_finite(v, f"{path}.{k}" if path else str(k))
            where += w
        return out, where
    if isinstance(obj, list | tuple):
        out_l, where = [], []
        for i, v in enumerate(obj):
            x, w = replace_non_finite(v, f"{path}[{i}]")
            out_l.append(x)
            where += w
        return out_l, where
    return obj, []


def to_strict_json(record: dict[str, Any]) -> str:
    clean, where = replace_non_finite(record)
    if where:
        clean["non_finite_replaced"] = where[:100]  # say which values were not numbers
    return json.dumps(clean, indent=1, sort_keys=True, default=str, allow_nan=False)


def record_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a record (None if it is one)."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a record object"
    missing = [k for k, t in RECORD_FIELDS.items() if not isinstance(obj.get(k), t)]
    if missing:
        return f"not a SlimBench record (missing or mistyped: {', '.join(missing)})"
    if obj["status"] not in STATUSES:
        return f"unknown status {obj['status']!r} (allowed: {', '.join(STATUSES)})"
    bad = [f"{a}.{b}" for a, b in NESTED_NAMES if not isinstance(obj[a].get(b), str)]
    if bad:
        return f"not a SlimBench record (missing or mistyped: {', '.join(bad)})"
    return None


# Units of machine-dependent measurements (latency, throughput, memory): they differ between
# two runs of the same cell, so comparisons of records leave them out.
MEASURED_UNITS = frozenset({"s", "ms", "us", "tokens/s", "GB/s", "MiB", "MB", "GiB"})
VOLATILE_FIELDS = ("started_at", "finished_at", "timings", "non_finite_replaced")
VOLATILE_REPORT_FIELDS = ("compress_seconds", "compress_peak_memory_mb")


def comparable_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what varies between two runs of the same cell (clock times, timings,
    memory readings): two executors running one suite must give equal comparable records."""
    rec = {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}
    metrics = record.get("metrics") or {}
    rec["metrics"] = {
        k: m for k, m in metrics.items() if not (isinstance(m, dict) and m.get("unit") in MEASURED_UNITS)
    }
    report = record.get("method_report")
    if isinstance(report, dict):
        report = {k: v for k, v in report.items() if k not in VOLATILE_REPORT_FIELDS}
        report["steps"] = [{k: v for k, v in s.items() if k != "seconds"} for s in report.get("steps", [])]
        rec["method_report"] = report
    if isinstance(record.get("error"), dict):
        rec["error"] = {k: v for k, v in record["error"].items() if k != "traceback"}
    return rec


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class ResultStore:
    """The records of one results folder.

    ``records()`` is the latest state of each cell, ``history()`` every attempt, and
    ``problems`` the (path, reason) of every file skipped because it is not a readable record.
    """

    def __init__(self, root: str | Path, *, warn: Callable[[str], None] = _warn_stderr):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.problems: list[tuple[Path, str]] = []
        self._warn = warn
        self._warned: set[tuple[Path, str]] = set()

    # -- reading ----------------------------------------------------------------------------
    def _problem(self, path: Path, reason: str) -> None:
        if (path, reason) not in self._warned:  # one warning per file and reason, however often read
            self._warned.add((path, reason))
            self.problems.append((path, reason))
            self._warn(f"skipped {path}: {reason}")

    def read(self, path: Path) -> dict[str, Any] | None:
        """The record in ``path``, or None (with one warning) if it is not a valid record."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            self._problem(path, f"unreadable ({err})")
            return None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            self._problem(path, f"not valid JSON, truncated or corrupted ({err})")
            return None
        problem = record_problem(rec)
        stem = path.name.split(".", 1)[0]
        if problem is None and rec["run_id"] != stem:
            problem = f"holds run {rec['run_id']!r}, but the file name says {stem!r}"
        if problem is None and path.name == f"{stem}.json" and rec["status"] != "ok":
            problem = f"status {rec['status']!r} in an ok record's file"
        if problem:
            self._problem(path, problem)
            return None
        return rec

    def ok_path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def ok_record(self, run_id: str) -> dict[str, Any] | None:
        return self.read(self.ok_path(run_id))

    def has_ok(self, run_id: str) -> bool:
        """True only for a readable, valid ok record: a broken file does not make a cell done."""
        return self.ok_record(run_id) is not None

    def failed_attempts(self, run_id: str) -> list[dict[str, Any]]:
        """The failed records of one cell, oldest first."""
        paths = sorted(self.runs.glob(f"{run_id}.failed.*.json")) if self.runs.is_dir() else []
        recs = [r for r in map(self.read, paths) if r is not None]
        return sorted(recs, key=lambda r: str(r.get("finished_at", "")))

    def record_files(self) -> list[Path]:
        if not self.runs.is_dir():
            return []
        return sorted(p for p in self.runs.glob("*.json") if not p.name.startswith("."))

    def history(self) -> list[dict[str, Any]]:
        """Every attempt (ok and failed), oldest first."""
        recs = [r for r in map(self.read, self.record_files()) if r is not None]
        return sorted(recs, key=lambda r: (str(r.get("finished_at", "")), r["run_id"]))

    def records(self, *, include_failed: bool = False) -> list[dict[str, Any]]:
        """The latest state of each cell, one record per run id, sorted by run id.

        The ok record where one exists; otherwise, with ``include_failed``, the newest failed
        attempt. Earlier failures of a cell that later succeeded stay in ``history()``.
        """
        latest: dict[str, dict[str, Any]] = {}
        for rec in self.history():  # oldest first: a later attempt replaces an earlier one
            prev = latest.get(rec["run_id"])
            if prev is None or prev["status"] != "ok":
                latest[rec["run_id"]] = rec
        out = [latest[k] for k in sorted(latest)]
        return out if include_failed else [r for r in out if r["status"] == "ok"]

    # -- writing ----------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> Path:
        """Write one record; an ok record never replaces another (FileExistsError).

        A file in an ok record's place that is not a valid record (truncated by a crash, a
        foreign file) is moved aside to ``<name>.corrupt-<time>`` first, so the cell it blocked
        gets its record.
        """
        run_id = record["run_id"]
        text = to_strict_json(record)
        if record["status"] != "ok":
            return self._write_failed(run_id, text)
        path = self.ok_path(run_id)
        try:
            atomic_write_text(path, text, overwrite=False)
        except FileExistsError:
            if self.read(path) is not None:
                raise
            self.quarantine(path)
            atomic_write_text(path, text, overwrite=False)
        return path

    def _write_failed(self, run_id: str, text: str) -> Path:
        for _ in range(100):  # two writers in the same microsecond: take the next name
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            path = self.runs / f"{run_id}.failed.{stamp}.json"
            try:
                atomic_write_text(path, text, overwrite=False)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"could not find a free name for a failed record of {run_id} in {self.runs}")

    def quarantine(self, path: Path) -> Path | None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            os.rename(path, target)
        except FileNotFoundError:  # another process moved it first
            return None
        return target

    def clean_temporary(self) -> int:
        """Remove temporary files left by writers of this host that are no longer running."""
        import psutil

        host, removed = socket.gethostname(), 0
        for p in self.runs.glob(".*.tmp") if self.runs.is_dir() else []:
            parts = p.name.split(".")
            # .<name>.<host>.<pid>.<random>.tmp  (name itself contains dots)
            try:
                pid = int(parts[-3])
            except (ValueError, IndexError):
                continue
            if parts[-4] == host and not psutil.pid_exists(pid):
                p.unlink(missing_ok=True)
                removed += 1
        return removed


# -- where the results go ----------------------------------------------------------------------
def check_results_folder(root: str | Path) -> Path:
    """Fail with one clear message unless ``root`` is (or can become) a writable folder.

    Nothing is created: the probe writes and removes a temporary file in the nearest folder
    that exists.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SuiteError(f"--results {root}: is a file, not a folder; give a folder for the records")
    probe_dir = root / "runs" if (root / "runs").is_dir() else root
    while not probe_dir.exists():
        parent = probe_dir.parent
        if parent == probe_dir:
            break
        probe_dir = parent
    if not probe_dir.is_dir():
        raise SuiteError(f"--results {root}: {probe_dir} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".slimbench-write-check.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise SuiteError(
            f"--results {root}: cannot write there ({err.strerror or err}); choose a writable folder"
        ) from None
    return root
