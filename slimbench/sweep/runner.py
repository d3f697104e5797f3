"""The runner: cells -> load model -> apply method -> evaluate tasks -> records.

Cells that share a model and a method config form a group: the model is loaded and
compressed once, then every task of the group is evaluated on it (compress once, evaluate
many). A cell that already has an ``ok`` record is skipped. Anything that raises inside a
group becomes ``failed`` records for the affected cells; the sweep goes on.

This module is what runs *inside* a worker (``iter_group``: one group, yielding records);
``slimbench.sweep.executors`` decides where groups run and ``slimbench.sweep.driver`` is the
driver that claims cells, hands groups to an executor and writes the records.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from slimbench.config import build_config
from slimbench.lm import LanguageModel
from slimbench.measure.clocks import environment, release_memory
from slimbench.measure.machine import resolve_threads
from slimbench.method import apply_method
from slimbench.registry import TASKS
from slimbench.specs import CellSpec
from slimbench.sweep.artifacts import cache as artifacts
from slimbench.sweep.store import utc_now
from slimbench.task import TaskContext
from slimbench.zoo.models import resolve


def load_model(cell: CellSpec) -> LanguageModel:
    resolve_threads(cell.hardware)  # sets torch's thread count; "auto" probes the fastest now
    loader = resolve(cell.model, source="suite", field="models")
    lm = loader(cell.model, cell.hardware)
    lm.spec = cell.model  # tasks that need the uncompressed model (fidelity) reload it from this
    return lm


# -- records -------------------------------------------------------------------------------
_PROCESS_ENV: dict[str, Any] | None = None


def cell_environment() -> dict[str, Any]:
    """The environment of the cell running now, as it runs.

    The process' facts (versions, CPU, git state) are read once per process; the torch
    threads are read for each cell, after ``load_model`` set the cell's own.
    """
    global _PROCESS_ENV
    if _PROCESS_ENV is None:
        _PROCESS_ENV = environment()
    return {**_PROCESS_ENV, "torch_threads": torch.get_num_threads()}


def base_record(cell: CellSpec, suite_source: str, env: dict, lm: LanguageModel | None) -> dict[str, Any]:
    return {
        "schema": 1,
        "run_id": cell.run_id,
        "suite": suite_source,
        "model": {**cell.model.to_dict(), "provenance": lm.provenance if lm else None},
        "method": cell.method.to_record(),
        "task": cell.task.to_dict(),
        "hardware": cell.hardware.to_dict(),
        "environment": env,
    }


def make_record(cell, suite_source, lm, status, started, *, metrics=None, details=None, report=None, error=None,
                timings=None, env=None) -> dict[str, Any]:
    rec = base_record(cell, suite_source, env or cell_environment(), lm)
    rec.update(
        status=status,
        error=error,
        metrics=metrics or {},
        task_details=details or {},
        method_report=report,
        timings=timings or {},
        started_at=started,
        finished_at=utc_now(),
    )
    return rec


def failure(exc: BaseException, stage: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def non_finite_metric(cell: CellSpec, metrics: dict[str, dict]) -> dict[str, Any] | None:
    """The failure of a cell whose metric is NaN or infinite (None if every value is finite).

    A NaN perplexity is not a bad score but no score: the cell fails, saying why, instead of
    an ``ok`` record that a leaderboard would rank.
    """
    quality = TASKS.get(cell.task.name).quality_metric if cell.task.name in TASKS else None
    for name, m in metrics.items():
        v = m.get("value")
        if not isinstance(v, int | float) or math.isfinite(v):
            continue
        kind = "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if name == quality or quality is None:
            model = "model" if cell.method.name == "baseline" else "compressed model"
            why = f"the {model} produces non-finite logits"
        else:
            why = "the measurement is not a finite number"
        return {"stage": "evaluate", "type": "NonFiniteMetric", "message": f"{name} is {kind}: {why}"}
    return None


def evaluate_cell(lm: LanguageModel, cell: CellSpec, method_report: dict, progress) -> tuple[dict, dict]:
    task = TASKS.get(cell.task.name)
    cfg = build_config(task.config, cell.task.params, source="record", field=cell.task.name)
    torch.manual_seed(0)
    result = task.evaluate(lm, cfg, TaskContext(hardware=cell.hardware, method_report=method_report, progress=progress))
    return {k: m.to_dict() for k, m in result.metrics.items()}, result.details


# -- one group -------------------------------------------------------------------------------
def group_cells(cells: list[CellSpec]) -> dict[tuple[str, str, str], list[CellSpec]]:
    groups: dict[tuple[str, str, str], list[CellSpec]] = {}
    for c in cells:
        key = (c.model.model_dump_json(), c.method.model_dump_json(), c.hardware.model_dump_json())
        groups.setdefault(key, []).append(c)
    return groups


def load_and_compress(head: CellSpec, progress=None, stage: dict | None = None) -> tuple[LanguageModel, dict]:
    """The load + compress stage of a group: the model, compressed, and the method report.

    One function, so that a cache of compressed models can wrap it. ``stage["name"]`` says
    which step is running (for the failure record); ``stage["load_seconds"]`` is filled in.
    """
    stage = {} if stage is None else stage
    stage["name"] = "load"
    t0 = time.perf_counter()
    cached = artifacts.lookup(head, log=lambda s: print(s, flush=True))  # compress once, across runs
    loaded = cached.load() if cached.hit else None
    if loaded is not None:
        stage["load_seconds"] = time.perf_counter() - t0
        return loaded
    lm = load_model(head)
    stage["load_seconds"] = time.perf_counter() - t0
    stage["name"] = "compress"
    storage: dict = {}
    method_report = apply_method(lm, head.method, head.hardware, progress, storage)
    cached.save(lm, method_report, storage)  # never raises: a problem becomes a reason in the report
    return lm, method_report


def iter_group(
    pending: list[CellSpec],
    suite_source: str,
    *,
    progress=None,
    memory_limit: int | None = None,
    lock=None,
) -> Iterator[tuple]:
    """Load, compress once, evaluate every pending cell of one (model, method, hardware) group.

    Yields events for the driver, which writes the records:
    ``("started", host, pid)``, ``("stage", kind, run_id, seconds)`` after the load, the
    compression (kind ``load``/``compress``, the group's first cell) and each evaluation
    (``evaluate``, that cell): what the ETA learns from; and ``("record", record)``.
    Every stage holds the node lock, shared, or exclusive for a timed task.
    """
    import socket

    from slimbench.sweep.executors.resources import MemoryGuard, cell_is_timed, node_lock

    lock = lock or node_lock()
    guard = MemoryGuard(memory_limit)
    head = pending[0]
    yield ("started", socket.gethostname(), os.getpid())
    lm, method_report, stage = None, None, {"name": "load"}
    started = utc_now()
    t0 = time.perf_counter()
    try:
        with lock.hold(), guard:
            lm, method_report = load_and_compress(head, progress, stage)
    except Exception as exc:  # a failing group becomes records, never a crashed sweep
        err = failure(exc, stage["name"])
        for c in pending:
            yield ("record", make_record(c, suite_source, lm, "failed", started, error=err))
        return
    load_s = stage.get("load_seconds", 0.0)
    yield ("stage", "load", head.run_id, load_s)
    yield ("stage", "compress", head.run_id, time.perf_counter() - t0 - load_s)
    release_memory()  # what compression freed should not count as inference memory
    timings = {"load_seconds": load_s}
    for c in pending:
        started = utc_now()
        t1 = time.perf_counter()
        try:
            timed = cell_is_timed(c)
            # a timed task gets a guard that wakes rarely: its samples must not steal the clock's cycles
            guard.interval = 1.0 if timed else 0.05
            with lock.hold(exclusive=timed), guard:
                metrics, details = evaluate_cell(lm, c, method_report, progress)
        except Exception as exc:  # likewise for one task
            rec = make_record(c, suite_source, lm, "failed", started, report=method_report,
                              error=failure(exc, "evaluate"))
        else:
            err = non_finite_metric(c, metrics)
            rec = make_record(c, suite_source, lm, "failed" if err else "ok", started, metrics=metrics,
                              details=details, report=method_report, error=err,
                              timings={**timings, "evaluate_seconds": time.perf_counter() - t1})
        yield ("stage", "evaluate", c.run_id, time.perf_counter() - t1)
        yield ("record", rec)
    del lm
    release_memory()
