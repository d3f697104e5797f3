"""Where a sweep stands, and how long the rest will take.

The ETA is built from what each kind of work cost, not from a rate of cells per second: a
cell's cost is its group's model load (or conversion), its method's compression and its own
task, each estimated from the nearest finished work of the same kind (the same model and
method, else the same method on any model, else any compression; likewise for loads and
tasks). The first cell of a run, which also converts a model, therefore does not skew it.

One model for the progress bar and ``status`` (:func:`eta_seconds`), per worker: each busy
worker finishes its unit, then takes the next queued unit as soon as it is free; timed work
holds the whole machine, so it is added after, one block after another. A running driver
writes its bar's state to ``RESULTS/progress/<host>.<pid>.json`` every few seconds
(:class:`ProgressFile`); ``status`` reads it, so both say the same.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import socket
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from slimbench.config import stable_hash
from slimbench.specs import CellSpec

# seconds, before anything was seen; a timed cell (warm-up, repeats to the protocol's minimum, its memory read
# in a fresh process) costs more than a quick quality cell, and never borrows their cost
DEFAULTS = {"load": 5.0, "compress": 2.0, "evaluate": 10.0, "timed": 30.0}


def _task_keys(model: str, task_label: str, params: Any) -> list[tuple]:
    h = stable_hash(params, 8)
    return [(model, task_label, h), ("*", task_label, h), (model, task_label), ("*", task_label), (model,), ("*",)]


def _compress_keys(model: str, label: str, name: str) -> list[tuple]:
    return [(model, label), ("*", label), (model, name), ("*", name), ("*",)]


@dataclass
class CostModel:
    """Seconds per kind of work, learned from records and from a running sweep."""

    seen: dict[str, dict[tuple, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def _add(self, kind: str, keys: list[tuple], seconds: float) -> None:
        for k in keys:
            self.seen[kind][k].append(float(seconds))

    def add(self, kind: str, cell: CellSpec | dict, seconds: float) -> None:
        """One observation: ``kind`` is load, compress or evaluate; ``cell`` a spec or a record."""
        self._add(kind, self.keys(kind, cell), seconds)

    @staticmethod
    def keys(kind: str, cell: CellSpec | dict) -> list[tuple]:
        if isinstance(cell, CellSpec):
            model, label, name = cell.model.name, cell.method.label(), cell.method.name
            task_label, params = cell.task.label(), cell.task.params
        else:
            model, label, name = cell["model"]["name"], cell["method"]["label"], cell["method"]["name"]
            task_label = f"{cell['task']['name']}@{cell['task'].get('version')}"
            params = cell["task"].get("params", {})
        if kind == "load":
            return [(model,), ("*",)]
        if kind == "compress":
            return _compress_keys(model, label, name)
        return _task_keys(model, task_label, params)

    def knows_method(self, cell: CellSpec) -> bool:
        """Has any finished cell run this cell's method (on any model)? Else its cost is borrowed."""
        return any(self.seen["compress"].get(k) for k in self.keys("compress", cell)[:-1])

    def estimate(self, kind: str, cell: CellSpec | dict, *, timed: bool = False) -> float:
        """Seconds of ``kind`` for ``cell``. ``timed``: a timed task, whose cost is learned only from
        the same task (a perplexity cell's seconds say nothing about a timed block's)."""
        keys = self.keys(kind, cell)
        if timed and kind == "evaluate":
            keys = keys[:4]  # the same task (and parameters), on this model or any
        for k in keys:
            obs = self.seen[kind].get(k)
            if obs:
                # A model's first load may include its one-time conversion: the next one will not.
                return min(obs) if kind == "load" else statistics.median(obs)
        return DEFAULTS["timed" if timed and kind == "evaluate" else kind]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> CostModel:
        """What finished cells cost (a group's load and compression counted once)."""
        cm = cls()
        groups_seen: set[tuple] = set()
        for r in records:
            t = r.get("timings") or {}
            rep = r.get("method_report") or {}
            # the cells of one group share its method report: one load and one compression
            group = (r["model"]["name"], r["method"]["label"], rep.get("compress_seconds"), t.get("load_seconds"))
            if group not in groups_seen:
                groups_seen.add(group)
                if isinstance(t.get("load_seconds"), int | float):
                    cm.add("load", r, t["load_seconds"])
                if isinstance(rep.get("compress_seconds"), int | float):
                    cm.add("compress", r, rep["compress_seconds"])
            seconds = t.get("evaluate_seconds")
            if not isinstance(seconds, int | float):
                seconds = _elapsed(r.get("started_at"), r.get("finished_at"))
            if r.get("status") == "ok" and seconds is not None:
                cm.add("evaluate", r, seconds)
        return cm

    def unit_seconds(self, cells: list[CellSpec], *, done: set[str] = frozenset(),
                     elapsed: float = 0.0) -> tuple[float, float]:
        """(seconds that may run beside other workers, seconds of timed work that holds the machine) a unit
        still needs. ``done``: finished stages ("load:<run id>", "compress:<run id>" of a group's first
        cell, evaluated run ids); ``elapsed``: seconds the stage in progress has run."""
        from slimbench.sweep.executors.resources import cell_is_timed
        from slimbench.sweep.runner import group_cells

        parallel = timed = 0.0
        for group in group_cells(cells).values():
            head = group[0].run_id
            parallel += 0.0 if f"load:{head}" in done else self.estimate("load", group[0])
            parallel += 0.0 if f"compress:{head}" in done else self.estimate("compress", group[0])
            for c in group:
                if c.run_id not in done:
                    if cell_is_timed(c):
                        timed += self.estimate("evaluate", c, timed=True)
                    else:
                        parallel += self.estimate("evaluate", c)
        cut = min(elapsed, parallel)
        return parallel - cut, max(0.0, timed - (elapsed - cut))

    def group_seconds(self, cells: list[CellSpec], *, done: set[str] = frozenset()) -> float:
        """Seconds a unit still needs, all of it (see :meth:`unit_seconds`)."""
        return sum(self.unit_seconds(cells, done=done))


def eta_seconds(running: list[tuple[float, float]], queued: list[tuple[float, float]], workers: int) -> float:
    """Seconds until the last unit is done: each of ``workers`` finishes its running unit, then takes
    the next queued one as soon as it is free; timed work (the second of each pair) runs alone,
    after. ``running``/``queued``: (parallel, timed) seconds per unit (:meth:`CostModel.unit_seconds`)."""
    workers = max(1, workers)
    free_at = sorted(p for p, _ in running)[:workers]
    free_at += [0.0] * (workers - len(free_at))
    heapq.heapify(free_at)
    end = max(free_at, default=0.0)
    for p, _ in queued:
        t = heapq.heappop(free_at) + p
        end = max(end, t)
        heapq.heappush(free_at, t)
    return end + sum(t for _, t in running) + sum(t for _, t in queued)


class ProgressFile:
    """What a running driver's bar says (ETA, workers, who waits for the machine lock), for `status`."""

    def __init__(self, store):
        self.dir = store.root / "progress"
        self.path = self.dir / f"{socket.gethostname()}.{os.getpid()}.json"

    def write(self, *, eta: float | None, workers: int, waiting: dict[str, str], cells_left: int,
              active: list[str] | None = None) -> None:
        from slimbench.sweep.store import atomic_write_text

        data = {"host": socket.gethostname(), "pid": os.getpid(), "written_at": time.time(), "eta_seconds": eta,
                "workers": workers, "waiting": waiting, "cells_left": cells_left}
        if active is not None:  # the cells being worked on; the run's other claimed cells are queued
            data["active"] = active
        with contextlib.suppress(OSError):  # a progress file is a courtesy: never a failed run
            atomic_write_text(self.path, json.dumps(data))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    @staticmethod
    def live(root) -> list[dict[str, Any]]:
        """The progress of every live driver of this results folder (on this host: its pid alive;
        elsewhere: written in the last five minutes)."""
        import psutil

        out = []
        folder = root / "progress"
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                d = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if d.get("host") == socket.gethostname():
                if not psutil.pid_exists(int(d.get("pid", -1))):
                    continue  # that run is gone
            elif time.time() - d.get("written_at", 0) > 300:
                continue  # another host's run, silent for five minutes: gone, as far as we can tell
            out.append(d)
        return out


def _elapsed(start: str | None, end: str | None) -> float | None:
    try:
        fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
        return (datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds()
    except (TypeError, ValueError):
        return None


def human_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# -- the state of a suite in a results folder ------------------------------------------------
@dataclass
class CellState:
    cell: CellSpec | None
    run_id: str
    # done | running | waiting (for the machine lock) | queued (claimed by a live run, not started yet) | failed |
    # pending | stale (claimed by a dead driver)
    state: str
    detail: str = ""
    label: str = ""


def suite_state(store, cells: list[CellSpec] | None, claim_book=None) -> list[CellState]:
    """One row per cell: of the suite's cells, or (no suite) of every cell the folder knows."""
    from slimbench.sweep.cell_claims import ClaimBook
    from slimbench.sweep.executors.node_lock import waiting_cells

    book = claim_book or ClaimBook(store)
    waits = waiting_cells()
    # what each live run works on now (its progress file): its other claimed cells are queued, not running
    active = {(d.get("host"), d.get("pid")): set(d["active"]) for d in ProgressFile.live(store.root) if "active" in d}
    latest = {r["run_id"]: r for r in store.records(include_failed=True)}
    claims = book.all_claims()
    ids = [c.run_id for c in cells] if cells is not None else sorted(set(latest) | set(claims))
    by_id = {c.run_id: c for c in cells or []}
    rows = []
    for run_id in ids:
        cell, rec = by_id.get(run_id), latest.get(run_id)
        label = _label(cell, rec, claims.get(run_id))
        if rec is not None and rec["status"] == "ok":
            rows.append(CellState(cell, run_id, "done", "", label))
        elif run_id in claims and claims[run_id][1]:
            owner = claims[run_id][0]
            if run_id in waits:
                rows.append(CellState(cell, run_id, "waiting", f"{waits[run_id][1]}; run {owner.describe()}", label))
            elif run_id not in active.get((owner.host, owner.pid), {run_id}):
                rows.append(CellState(cell, run_id, "queued", f"next in run {owner.describe()}", label))
            else:
                rows.append(CellState(cell, run_id, "running", f"by {owner.describe()}", label))
        elif run_id in claims:
            owner = claims[run_id][0]
            rows.append(CellState(cell, run_id, "stale", f"claimed by {owner.host}:{owner.pid}, which is gone", label))
        elif rec is not None:
            e = rec.get("error") or {}
            why = f"{e.get('stage', '?')}: {e.get('type', '')}: {e.get('message', '')}".replace("\n", " ")
            rows.append(CellState(cell, run_id, "failed", why[:300], label))
        else:
            rows.append(CellState(cell, run_id, "pending", "", label))
    return rows


def _label(cell: CellSpec | None, rec: dict | None, claim) -> str:
    if cell is not None:
        return f"{cell.model.name} | {cell.method.label()} | {cell.task.label()}"
    if rec is not None:
        return f"{rec['model']['name']} | {rec['method']['label']} | {rec['task']['name']}"
    return claim[0].label if claim else ""


@dataclass
class Eta:
    seconds: float
    # methods of unfinished cells no finished cell has run: their compression cost is borrowed
    # from other methods' and may be far off (a search or a calibrated method costs minutes)
    unseen_methods: list[str]
    workers: int = 1
    source: str = "estimated from the finished cells"


def remaining_seconds(cells: list[CellSpec], rows: list[CellState], cost: CostModel, *, workers: int = 1,
                      interleave: bool = True) -> Eta:
    """Time the cells not yet done need with ``workers`` workers (groups load and compress once)."""
    from slimbench.sweep.runner import units_of

    todo = {r.run_id for r in rows if r.state in ("pending", "running", "waiting", "queued", "stale", "failed")}
    units = units_of([c for c in cells if c.run_id in todo], interleave=interleave)
    unseen = {c.method.name for u in units for c in u if not cost.knows_method(c)}
    return Eta(eta_seconds([], [cost.unit_seconds(u) for u in units], workers), sorted(unseen), workers)


def live_eta(root) -> Eta | None:
    """The ETA a running driver's bar shows now (the newest, if several run on this folder)."""
    live = [d for d in ProgressFile.live(root) if d.get("eta_seconds") is not None]
    if not live:
        return None
    d = max(live, key=lambda x: x["written_at"])
    left = max(0.0, d["eta_seconds"] - (time.time() - d["written_at"]))
    return Eta(left, [], int(d.get("workers") or 1), f"the progress bar of run {d['host']}:{d['pid']}")


def format_status(rows: list[CellState], eta: Eta | None, *, verbose_done: bool = False) -> str:
    states = ("done", "running", "waiting", "queued", "failed", "stale", "pending")
    counts = {k: sum(r.state == k for r in rows) for k in states}
    head = ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("done", "pending"))
    lines = [f"{len(rows)} cells: {head}"]
    for r in rows:
        if r.state == "done" and not verbose_done:
            continue
        extra = f"  ({r.detail})" if r.detail else ""
        lines.append(f"  {r.state:<8} {r.run_id}  {r.label}{extra}")
    if eta is not None and len(rows) > counts["done"]:
        workers = f"{eta.workers} worker{'s' if eta.workers != 1 else ''}"
        lines.append(f"ETA: about {human_seconds(eta.seconds)} for the {len(rows) - counts['done']} cells not done, "
                     f"with {workers} ({eta.source}; timed cells hold the machine alone)")
        if counts["waiting"]:
            lines.append("  cells waiting for the machine lock wait on another run: the ETA starts when it is free")
        if eta.unseen_methods:
            lines.append(
                f"  no finished cell has run {', '.join(eta.unseen_methods)} yet: "
                "its compression time is borrowed from other methods' and may be far off"
            )
    return "\n".join(lines)
