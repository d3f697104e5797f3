"""The timed block of a unit: the timed cells a report compares, measured interleaved.

Cells of one model, task protocol (name, version, parameters) and hardware are what a report
puts side by side (a speed-up is a ratio of two of them). Measured one after another, minutes
apart, on a shared or drifting machine, their ratio mixes the methods with the machine's state;
so their repeats alternate in one process, A B C, then C B A, ... (as ``accel-bench`` does), each
model held in memory for the block, the machine lock held exclusively. A task takes part through
its ``session`` (slimbench/task.py); one without a session is measured cell by cell.

Per comparison the block: builds every cell's session; reads each cell's peak memory in a fresh
process that holds only its model (slimbench.sweep.memory_probe; else in this process, saying
why); warms every session up; runs rounds until every session has what its protocol asks for
(each active session samples once per round, the order reversed every other round); then writes
each record, with ``task_details["interleaving"]`` saying with whom it alternated, or why it was
measured alone (slimbench.measure.trust).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from slimbench.config import build_config
from slimbench.registry import TASKS
from slimbench.specs import CellSpec
from slimbench.sweep import memory_probe
from slimbench.sweep.cellrun import acquire, evaluate_cell, failure, lock_who, make_record, non_finite_metric
from slimbench.sweep.executors.node_lock import LockTimeout
from slimbench.sweep.store import utc_now
from slimbench.task import TaskContext

ORDER = "alternating: A B C, then C B A, ..."


@dataclass
class Held:
    """The timed cells of one group, and its compressed model, kept for the timed block."""

    cells: list[CellSpec]
    lm: Any
    report: dict[str, Any]
    timings: dict[str, Any]


@dataclass
class Entry:
    cell: CellSpec
    held: Held
    session: Any = None
    started: str = field(default_factory=utc_now)
    reading: dict[str, Any] | None = None
    memory_why: str | None = None
    error: dict[str, Any] | None = None


def comparisons(held: list[Held]) -> list[list[tuple[CellSpec, Held]]]:
    """The timed cells grouped by what makes them comparable: model, task protocol, hardware."""
    out: dict[str, list[tuple[CellSpec, Held]]] = {}
    for h in held:
        for c in h.cells:
            key = c.model.model_dump_json() + c.task.model_dump_json() + c.hardware.model_dump_json()
            out.setdefault(key, []).append((c, h))
    return list(out.values())


def alone_reason(options, block: int) -> str:
    if not options.interleave:
        return "run with --no-interleave: every group on its own"
    if block:
        return ("the memory limit allowed no other model of this comparison beside it; the others were measured "
                "in another block")
    return "no other cell of this comparison (same model, task protocol and hardware) was pending in this run"


def interleaving_info(entries: list[Entry], me: Entry, rounds: int, options, block: int) -> dict[str, Any]:
    peers = [e for e in entries if e is not me and e.error is None]
    if not peers:
        return {"interleaved": False, "with": [], "labels": [], "rounds": rounds, "order": None,
                "reason": alone_reason(options, block)}
    info = {"interleaved": True, "with": [e.cell.run_id for e in peers],
            "labels": [e.cell.method.label() for e in peers], "rounds": rounds, "order": ORDER, "reason": None}
    if block:
        info["note"] = f"block {block}: the memory limit split this comparison; cells of other blocks not interleaved"
    return info


def timed_block(held: list[Held], suite_source: str, lock, guard, progress, options, block: int = 0) -> Iterator[tuple]:
    """Every timed cell of ``held``, under the exclusive machine lock; yields stage and record events."""
    cells = [c for h in held for c in h.cells]
    started = utc_now()
    yield ("begin", [c.run_id for c in cells])
    try:
        yield from acquire(lock, True, lock_who(cells, suite_source), options.lock_timeout)
    except LockTimeout as exc:
        for h in held:
            for c in h.cells:
                yield ("record", make_record(c, suite_source, h.lm, "failed", started, report=h.report,
                                             error=failure(exc, "lock")))
        return
    guard.interval = 1.0  # a guard that wakes rarely: its samples must not steal the clock's cycles
    try:
        for comp in comparisons(held):
            task = TASKS.get(comp[0][0].task.name)
            if task.session is None:
                for c, h in comp:  # a timed task that cannot interleave: cell by cell
                    yield from _alone(c, h, suite_source, guard, progress)
                continue
            yield from _interleaved(task, comp, suite_source, guard, progress, options, block)
    finally:
        lock.release()


def _alone(c: CellSpec, h: Held, suite_source: str, guard, progress) -> Iterator[tuple]:
    started, t1 = utc_now(), time.perf_counter()
    try:
        with guard:
            metrics, details = evaluate_cell(h.lm, c, h.report, progress)
    except Exception as exc:
        rec = make_record(c, suite_source, h.lm, "failed", started, report=h.report, error=failure(exc, "evaluate"))
    else:
        err = non_finite_metric(c, metrics)
        rec = make_record(c, suite_source, h.lm, "failed" if err else "ok", started, metrics=metrics, details=details,
                          report=h.report, error=err,
                          timings={**h.timings, "evaluate_seconds": time.perf_counter() - t1})
    yield ("stage", "evaluate", c.run_id, time.perf_counter() - t1)
    yield ("record", rec)


def _interleaved(task, comp, suite_source, guard, progress, options, block) -> Iterator[tuple]:
    t0 = time.perf_counter()
    entries = [Entry(c, h) for c, h in comp]
    bar = progress(total=len(entries), desc="timed: memory, fresh processes", unit="cell") if progress else None
    for e in entries:  # sessions, and each model's memory in a fresh process (before anything is timed)
        try:
            cfg = build_config(task.config, e.cell.task.params, source="record", field=e.cell.task.name)
            ctx = TaskContext(hardware=e.cell.hardware, method_report=e.held.report, progress=None)
            e.session = task.session(e.held.lm, cfg, ctx)
            e.reading, e.memory_why = memory_probe.probe(e.cell, e.held.report, options.preload)
        except Exception as exc:
            e.error = failure(exc, "evaluate")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    memo: dict = {}
    live = [e for e in entries if e.error is None]
    bar = progress(total=len(live), desc=f"timed: warm-up of {len(live)}", unit="cell") if progress else None
    for e in live:
        e.session.limits_memo = memo  # one measurement of the limits per working set for the block
        _step(e, e.session.warm, guard)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rounds = yield from _rounds([e for e in entries if e.error is None], guard, progress)
    share = (time.perf_counter() - t0) / max(1, len(entries))
    for e in entries:
        if e.error is None:
            e.session.interleaving = interleaving_info(entries, e, rounds, options, block)
            try:
                with guard:
                    res = e.session.result(e.reading)
                metrics = {k: m.to_dict() for k, m in res.metrics.items()}
                details = res.details
                if e.memory_why and isinstance(details.get("memory_protocol"), dict):
                    details["memory_protocol"]["why_not_fresh"] = e.memory_why
            except Exception as exc:
                e.error = failure(exc, "evaluate")
        if e.error is not None:
            rec = make_record(e.cell, suite_source, e.held.lm, "failed", e.started, report=e.held.report,
                              error=e.error)
        else:
            err = non_finite_metric(e.cell, metrics)
            timings = {**e.held.timings, "evaluate_seconds": share, "block_seconds": share * len(entries)}
            rec = make_record(e.cell, suite_source, e.held.lm, "failed" if err else "ok", e.started, metrics=metrics,
                              details=details, report=e.held.report, error=err, timings=timings)
        yield ("stage", "evaluate", e.cell.run_id, share)
        yield ("record", rec)


def _step(e: Entry, fn, guard) -> None:
    try:
        with guard:
            fn()
    except Exception as exc:  # this cell fails; the others go on
        e.error = failure(exc, "evaluate")


def _rounds(live: list[Entry], guard, progress) -> Iterator[tuple]:
    """Timed rounds until no session asks for more; the order reverses every round. Returns the rounds run."""
    rounds = 0
    bar = progress(total=None, desc=f"timed: {len(live)} interleaved", unit="round") if progress else None
    while True:
        active = [e for e in live if e.error is None and e.session.needs_more()]
        if not active:
            break
        for e in active if rounds % 2 == 0 else active[::-1]:  # A B C, C B A: drift hits all alike
            _step(e, e.session.sample, guard)
        rounds += 1
        if bar is not None:
            bar.update(1)
        if rounds % 5 == 0:
            yield ("progress", {"rounds": rounds})  # the driver's bar stays alive during a long block
    if bar is not None:
        bar.close()
    return rounds
