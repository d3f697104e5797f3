"""The runner: cells -> load model -> apply method -> evaluate tasks -> records.

Cells that share a model and a method config form a group: the model is loaded and
compressed once, then every task of the group is evaluated on it (compress once, evaluate
many). A cell that already has an ``ok`` record is skipped. Anything that raises inside a
group becomes ``failed`` records for the affected cells; the sweep goes on.

This module is what runs *inside* a worker (``iter_group``: one unit of groups, yielding records);
``slimbench.sweep.executors`` decides where groups run and ``slimbench.sweep.driver`` is the
driver that claims cells, hands groups to an executor and writes the records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from slimbench.measure.clocks import release_memory
from slimbench.specs import CellSpec
from slimbench.sweep.cellrun import (  # noqa: F401 - re-exported: the runner's public names
    RunOptions,
    acquire,
    base_record,
    cell_environment,
    evaluate_cell,
    failure,
    load_and_compress,
    load_model,
    lock_who,
    make_record,
    non_finite_metric,
)
from slimbench.sweep.store import utc_now
from slimbench.sweep.timed import Held, timed_block


# -- one group ---------------------------------------------------------------------------------
def group_cells(cells: list[CellSpec]) -> dict[tuple[str, str, str], list[CellSpec]]:
    groups: dict[tuple[str, str, str], list[CellSpec]] = {}
    for c in cells:
        key = (c.model.model_dump_json(), c.method.model_dump_json(), c.hardware.model_dump_json())
        groups.setdefault(key, []).append(c)
    return groups


def units_of(cells: list[CellSpec], *, interleave: bool = True) -> list[list[CellSpec]]:
    """The units a sweep hands to workers: one group each, except that groups whose timed cells a report
    compares (same model and hardware) form one unit, so their timed cells can be measured interleaved."""
    from slimbench.sweep.executors.resources import cell_is_timed

    units: list[list[CellSpec]] = []
    merged: dict[tuple[str, str], list[CellSpec]] = {}
    for group in group_cells(cells).values():
        if not interleave or not any(cell_is_timed(c) for c in group):
            units.append(group)
            continue
        key = (group[0].model.model_dump_json(), group[0].hardware.model_dump_json())
        if key in merged:
            merged[key].extend(group)
        else:
            merged[key] = list(group)
            units.append(merged[key])
    return units


def _compress_group(cells, suite_source, lock, guard, progress, options) -> Iterator[tuple]:
    """Load and compress one group (shared lock); returns (lm, report, timings), or None after failed records."""
    head = cells[0]
    stage: dict[str, Any] = {"name": "lock"}
    lm, started = None, utc_now()
    yield ("begin", [c.run_id for c in cells])
    try:
        yield from acquire(lock, False, lock_who(cells, suite_source), options.lock_timeout)
        t0 = time.perf_counter()
        try:
            with guard:
                lm, method_report = load_and_compress(head, progress, stage)
        finally:
            lock.release()
    except Exception as exc:  # a failing group becomes records, never a crashed sweep
        err = failure(exc, stage["name"])
        for c in cells:
            yield ("record", make_record(c, suite_source, lm, "failed", started, error=err))
        return None
    load_s = stage.get("load_seconds", 0.0)
    yield ("stage", "load", head.run_id, load_s)
    yield ("stage", "compress", head.run_id, time.perf_counter() - t0 - load_s)
    release_memory()  # what compression freed should not count as inference memory
    return lm, method_report, {"load_seconds": load_s}


def evaluate_alone(c, lm, method_report, timings, suite_source, lock, guard, progress, options) -> Iterator[tuple]:
    """One cell's task, under the lock (exclusive for a timed task): a stage event and its record."""
    from slimbench.sweep.executors.resources import cell_is_timed

    started = utc_now()
    t1 = time.perf_counter()
    stage = "lock"
    yield ("begin", [c.run_id])
    try:
        timed = cell_is_timed(c)
        yield from acquire(lock, timed, lock_who([c], suite_source), options.lock_timeout)
        stage = "evaluate"
        # a timed task gets a guard that wakes rarely: its samples must not steal the clock's cycles
        guard.interval = 1.0 if timed else 0.05
        try:
            with guard:
                metrics, details = evaluate_cell(lm, c, method_report, progress)
        finally:
            lock.release()
    except Exception as exc:  # likewise for one task
        rec = make_record(c, suite_source, lm, "failed", started, report=method_report, error=failure(exc, stage))
    else:
        err = non_finite_metric(c, metrics)
        rec = make_record(c, suite_source, lm, "failed" if err else "ok", started, metrics=metrics,
                          details=details, report=method_report, error=err,
                          timings={**timings, "evaluate_seconds": time.perf_counter() - t1})
    yield ("stage", "evaluate", c.run_id, time.perf_counter() - t1)
    yield ("record", rec)


def lock_timed_out(event: tuple) -> bool:
    """Whether ``event`` is a record failed because the machine lock stayed busy past --lock-timeout."""
    return (event[0] == "record" and event[1].get("status") == "failed"
            and (event[1].get("error") or {}).get("type") == "LockTimeout")


class _Stages:
    """The options each stage of a unit runs with: once one stage waited the whole --lock-timeout, the
    later ones only try the lock (timeout 0, still taken when free) instead of waiting that long again."""

    def __init__(self, options: RunOptions):
        self.options = options

    def watch(self, events: Iterator[tuple]) -> Iterator[tuple]:
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            if lock_timed_out(event) and self.options.lock_timeout:
                self.options = replace(self.options, lock_timeout=0.0)
            yield event


def held_rss() -> int:
    """Resident bytes of this process and its children: an engine step's model lives in the
    engine's own process (llama.cpp's with Gemma 3's logits: 1.4 GiB each), held as long as its group is."""
    import contextlib

    import psutil

    me = psutil.Process()
    rss = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone between the listing and the reading
            rss += child.memory_info().rss
    return rss


def memory_is_short(memory_limit: int | None) -> bool:
    """Whether holding one more model for an interleaved block could pass the memory limit."""
    return bool(memory_limit) and held_rss() > 0.5 * memory_limit


def iter_group(
    pending: list[CellSpec],
    suite_source: str,
    *,
    progress=None,
    memory_limit: int | None = None,
    lock=None,
    options: RunOptions | None = None,
) -> Iterator[tuple]:
    """Run a unit of cells: each (model, method, hardware) group loaded and compressed once, its
    untimed cells evaluated at once, its timed cells kept for one block where the timed cells
    that a report compares (same model, task protocol and hardware) alternate their repeats
    (slimbench.sweep.timed).

    Yields events for the driver, which writes the records:
    ``("started", host, pid)``; ``("begin", run_ids)`` as a stage starts on those cells (the others of
the unit are queued); ``("waiting", info)`` while the machine lock is busy (about once
    a second: ``info["text"]`` says on whom); ``("stage", kind, run_id, seconds)`` after each load,
    compression (kind ``load``/``compress``, the group's first cell) and evaluation (``evaluate``,
    that cell): what the ETA learns from; ``("progress", info)`` now and then during a long timed
    block (the bar stays alive); and ``("record", record)``. Every stage holds the machine
    lock, shared, or exclusive for timed tasks (none with ``options.use_lock`` false).
    """
    import socket

    from slimbench.sweep.executors.node_lock import NoLock, node_lock
    from slimbench.sweep.executors.resources import MemoryGuard, cell_is_timed

    options = options or RunOptions()
    lock = lock or (node_lock() if options.use_lock else NoLock())
    guard = MemoryGuard(memory_limit)
    yield ("started", socket.gethostname(), os.getpid())
    held: list[Held] = []
    blocks = 0
    stages = _Stages(options)
    for cells in group_cells(pending).values():
        got = yield from stages.watch(_compress_group(cells, suite_source, lock, guard, progress, stages.options))
        if got is None:
            continue
        lm, report, timings = got
        for c in cells:
            if not cell_is_timed(c):
                yield from stages.watch(evaluate_alone(c, lm, report, timings, suite_source, lock, guard, progress,
                                                       stages.options))
        timed = [c for c in cells if cell_is_timed(c)]
        if timed:
            held.append(Held(timed, lm, report, timings))
        del lm
        release_memory()
        if held and memory_is_short(memory_limit):
            blocks += 1
            yield from stages.watch(timed_block(held, suite_source, lock, guard, progress, stages.options,
                                                block=blocks))
            held = []
            release_memory()
    if held:
        yield from timed_block(held, suite_source, lock, guard, progress, stages.options,
                               block=blocks + 1 if blocks else 0)
        held = []
    release_memory()
