"""The records a report shows: the latest state of each cell, from one or more results folders.

A cell is identified by its run id (a hash of model, method config and version, task and
hardware spec) and the machine it ran on: the same cell run on two machines is two results,
the same cell found in two folders copied from one machine is one. Of several states of one
cell, an ok record wins over failed attempts (history stays in the store), and the latest wins
among equals. Files the store cannot read are skipped and listed, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slimbench.sweep.store import ResultStore


@dataclass
class Loaded:
    ok: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)  # "path: reason" of skipped files
    sources: list[str] = field(default_factory=list)


def machine(rec: dict[str, Any]) -> str:
    env = rec.get("environment") or {}
    return str(env.get("gpu") or env.get("cpu") or "?")


def cell_key(rec: dict[str, Any]) -> tuple[str, str]:
    return rec["run_id"], machine(rec)


def newer(rec: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether ``rec`` is a later state of the same cell than ``old``."""
    rank = (rec.get("status") == "ok", str(rec.get("finished_at") or ""))
    return rank > (old.get("status") == "ok", str(old.get("finished_at") or ""))


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell: its latest state, in first-seen order."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        key = cell_key(rec)
        if key not in out or newer(rec, out[key]):
            out[key] = rec
    return list(out.values())


def well_formed(rec: Any) -> bool:
    """Enough of a record to place in a table (foreign JSON files are skipped, not crashed on)."""
    return (
        isinstance(rec, dict)
        and isinstance(rec.get("run_id"), str)
        and all(isinstance(rec.get(k), dict) for k in ("model", "method", "task", "hardware"))
        and isinstance(rec["model"].get("name"), str)
        and isinstance(rec["method"].get("name"), str)
        and isinstance(rec["task"].get("name"), str)
        and all(isinstance(rec.get(k) or {}, dict) for k in ("metrics", "method_report", "task_details", "environment"))
    )


def load(stores: ResultStore | Iterable[ResultStore]) -> Loaded:
    """The latest state of every cell found in ``stores``, and what could not be read."""
    stores = [stores] if isinstance(stores, ResultStore) else list(stores)
    found, problems = [], []
    for store in stores:
        recs = store.records(include_failed=True)
        problems += [f"{path}: {reason}" for path, reason in getattr(store, "problems", [])]
        for rec in recs:
            if well_formed(rec):
                found.append(rec)
            else:
                problems.append(f"{store.runs}/{rec.get('run_id', '?')}: record lacks model/method/task/hardware")
    cells = latest(found)
    return Loaded(
        ok=[r for r in cells if r.get("status") == "ok"],
        failed=[r for r in cells if r.get("status") != "ok"],
        problems=problems,
        sources=[str(s.root) for s in stores],
    )
