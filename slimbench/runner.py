"""The runner: cells -> load model -> apply method -> evaluate tasks -> records.

Cells that share a model and a method config form a group: the model is loaded and
compressed once, then every task of the group is evaluated on it (compress once, evaluate
many). A cell that already has an ``ok`` record is skipped. Anything that raises inside a
group becomes ``failed`` records for the affected cells; the sweep goes on.

This module is what runs *inside* a worker (``iter_group``: one group, yielding records);
``slimbench.executors`` decides where groups run and ``slimbench.executors.sweep`` is the
driver that claims cells, hands groups to an executor and writes the records.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from slimbench import artifacts
from slimbench.config import build_config
from slimbench.lm import LanguageModel
from slimbench.machine import resolve_threads
from slimbench.measure import PeakMemory, environment, release_memory
from slimbench.method import MethodContext, MethodReport
from slimbench.modeling import (
    CompressedLinear,
    count_parameters,
    iter_linears,
    linear_numel,
    memory_bytes,
    serialized_bytes,
    sparsity_stats,
    storage_state,
    unique_tensors,
)
from slimbench.models import resolve
from slimbench.registry import METHODS, TASKS
from slimbench.specs import CellSpec, MethodSpec
from slimbench.store import ResultStore, utc_now
from slimbench.task import TaskContext


def load_model(cell: CellSpec) -> LanguageModel:
    resolve_threads(cell.hardware)  # sets torch's thread count; "auto" probes the fastest now
    loader = resolve(cell.model, source="suite", field="models")
    lm = loader(cell.model, cell.hardware)
    lm.spec = cell.model  # tasks that need the uncompressed model (fidelity) reload it from this
    return lm


# -- applying a method ---------------------------------------------------------------------
def apply_method(lm: LanguageModel, spec: MethodSpec, hw, progress=None, storage=None) -> dict[str, Any]:
    """Apply every step, then measure what was achieved: the method report of the record.

    ``storage`` (optional, filled in): the stored forms the steps reported, for the artifact cache.
    """
    filled = storage  # the caller's dict, refilled at the end (renames rebind the local one)
    storage: dict[str, dict[str, torch.Tensor]] = {}
    steps, execution = [], "native"
    t0 = time.perf_counter()
    with PeakMemory(lm.device) as mem:
        for step in spec.steps:
            method = METHODS.get(step.name)
            cfg = build_config(method.config, step.params, source="record", field=step.name)
            ctx = MethodContext(hardware=hw, progress=progress)
            t_step = time.perf_counter()
            held = tensor_ids(lm.model, storage)
            rep: MethodReport = method.run(lm, cfg, ctx)  # checks, budget guard, seeded apply, report warnings
            storage = follow_renames(lm.model, storage, held)
            storage.update(rep.storage)  # a later step's stored form of a weight replaces an earlier one
            execution = "simulated" if rep.execution == "simulated" else execution
            steps.append(
                {
                    "name": step.name,
                    "execution": rep.execution,
                    "seconds": time.perf_counter() - t_step,
                    "details": rep.details,
                    "notes": rep.notes,
                    "warnings": rep.warnings,
                }
            )
    seconds = time.perf_counter() - t0
    if filled is not None:
        filled.clear()
        filled.update(storage)
    return {
        "execution": execution,
        "steps": steps,
        "warnings": [f"{s['name']}: {w}" for s in steps for w in s["warnings"]],
        "compress_seconds": seconds,
        "compress_peak_memory_mb": mem.peak_bytes / 2**20,
        "compress_memory_kind": mem.kind,
        **size_report(lm.model, storage),
    }


def tensor_ids(model: torch.nn.Module, storage: dict[str, Any]) -> dict[str, int]:
    """Storage key -> the data pointer of the parameter it describes."""
    tensors = unique_tensors(model)
    return {k: tensors[k].untyped_storage().data_ptr() for k in storage if k in tensors}


def follow_renames(model: torch.nn.Module, storage: dict[str, Any], held: dict[str, int]) -> dict[str, Any]:
    """Earlier steps' stored forms, keyed by the names their tensors have now: a step that
    wraps the model (an accelerator replacing ``lm.model``) renames every parameter."""
    tensors = unique_tensors(model)
    name_of = {t.untyped_storage().data_ptr(): k for k, t in tensors.items()}
    out = {}
    for k, v in storage.items():
        if k in held and held[k] not in name_of and k not in tensors:
            continue  # the weight itself is gone (a later step replaced its module): its old form too
        out[name_of.get(held.get(k), k)] = v
    return out


SIZE_KEYS = ("parameters", "memory_bytes", "stored_bytes", "stored_format", "effective_bits", "bits_per_parameter")


def size_report(model: torch.nn.Module, storage: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Parameters, bytes in memory, bytes of the stored form, effective bits, sparsity."""
    own = getattr(model, "slimbench_size", None)
    if callable(own):  # an execution engine whose weights live outside this process' torch modules
        return {**dict.fromkeys(SIZE_KEYS), **own()}
    state = storage_state(model, storage)
    linear_bits = numel = 0
    for name, mod in iter_linears(model):
        key = f"{name}.weight"
        if key in storage:
            tensors = storage[key].values()
        elif isinstance(mod, CompressedLinear):
            tensors = mod.weight_storage().values()
        else:
            tensors = [mod.weight.data]
        linear_bits += 8 * sum(t.numel() * t.element_size() for t in tensors)
        numel += linear_numel(mod)
    params = count_parameters(model)
    stored = serialized_bytes(state)
    return {
        "parameters": params,
        "memory_bytes": memory_bytes(model),
        "stored_bytes": stored,
        "stored_format": "packed" if storage else "dense",
        "effective_bits": linear_bits / numel if numel else None,
        "bits_per_parameter": 8 * stored / params,
        **sparsity_stats(model),
    }


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

    from slimbench.executors.resources import MemoryGuard, cell_is_timed, node_lock

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


# -- the sweep -------------------------------------------------------------------------------
def run_cells(
    cells: list[CellSpec],
    store: ResultStore,
    *,
    suite_source: str = "",
    show_progress: bool = True,
    isolate: bool = False,
    timeout: float | None = None,
    executor=None,
    memory_limit: int | None = None,
    log: Callable[[str], None] = print,
):
    """Run every cell without an ok record and write its record; returns a RunSummary.

    ``executor``: where groups run (default: this process, one group after another; with
    ``isolate`` or a ``timeout``, one fresh worker process per group).
    """
    from slimbench.executors import LocalExecutor
    from slimbench.executors.sweep import sweep

    if executor is None:
        workers = 1 if (isolate or timeout is not None) else None
        executor = LocalExecutor(workers=workers, isolate=isolate, timeout=timeout, memory_limit=memory_limit)
    return sweep(cells, store, executor, suite_source=suite_source, show_progress=show_progress, log=log)
