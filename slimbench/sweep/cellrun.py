"""One cell's work, shared by every path of the runner: load and compress, evaluate, the lock it
waits for, and the record it becomes (what the record holds: README, "Records").
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from slimbench.config import build_config
from slimbench.lm import LanguageModel
from slimbench.measure import memory
from slimbench.measure.clocks import environment
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


def method_record(cell: CellSpec) -> dict[str, Any]:
    """The method as the record keeps it: its steps, and each step's family (``families``) and the
    chain's (``family``), so that a report renders it without the method's code (a plugin that is
    not installed where the report is made)."""
    from slimbench.registry import METHODS

    rec = cell.method.to_record()
    families = [METHODS.get(s.name).family if s.name in METHODS else None for s in cell.method.steps]
    rec["families"] = families
    rec["family"] = "+".join(dict.fromkeys(f for f in families if f)) or None
    return rec


def task_info(cell: CellSpec) -> dict[str, Any] | None:
    """What a report needs of the task beside its parameters: which metric is quality, which per-example
    score decides noise, whether it is timed."""
    if cell.task.name not in TASKS:
        return None
    task = TASKS.get(cell.task.name)
    return {"quality_metric": task.quality_metric, "paired_metric": task.paired_metric or task.quality_metric,
            "timed": task.timed, "provider": cell.task.provider, "description": task.description}


def base_record(cell: CellSpec, suite_source: str, env: dict, lm: LanguageModel | None) -> dict[str, Any]:
    return {
        "schema": 1,
        "run_id": cell.run_id,
        "suite": suite_source,
        "model": {**cell.model.to_dict(), "provenance": lm.provenance if lm else None},
        "method": method_record(cell),
        "task": cell.task.to_dict(),
        "task_info": task_info(cell),
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


def load_and_compress(head: CellSpec, progress=None, stage: dict | None = None,
                      log=lambda s: print(s, flush=True), storage: dict | None = None) -> tuple[LanguageModel, dict]:
    """The load + compress stage of a group: the model, compressed, and the method report.

    One function, so that a cache of compressed models can wrap it. ``stage["name"]`` says
    which step is running (for the failure record); ``stage["load_seconds"]`` is filled in;
    ``storage`` (optional) receives the stored forms, compressed now or read from the cache.
    """
    stage = {} if stage is None else stage
    stage["name"] = "load"
    t0 = time.perf_counter()
    # what this process holds before its first model is its runtime (memory readings); read before
    # loading, not after minus the model's bytes: a model loaded from safetensors is mapped, not
    # read, so its tensors are not all resident yet (SmolLM2: 437 MiB against 513 MiB of tensors)
    memory.note_runtime()
    cached = artifacts.lookup(head, log=log)  # compress once, across runs
    loaded = cached.load() if cached.hit else None
    storage = {} if storage is None else storage
    if loaded is not None:
        storage.update(cached.stored_forms())
        stage["load_seconds"] = time.perf_counter() - t0
        return loaded
    lm = load_model(head)
    stage["load_seconds"] = time.perf_counter() - t0
    stage["name"] = "compress"
    method_report = apply_method(lm, head.method, head.hardware, progress, storage)
    cached.save(lm, method_report, storage)  # never raises: a problem becomes a reason in the report
    return lm, method_report


@dataclass(frozen=True)
class RunOptions:
    """How a worker runs its cells (the same for every executor; sent to worker processes)."""

    lock_timeout: float | None = None  # give up on the machine lock after this many seconds
    use_lock: bool = True  # False (--quality-only): take no machine lock at all
    interleave: bool = True  # the driver formed units that interleave timed cells (False: --no-interleave)
    preload: tuple[str, ...] = ()  # modules a fresh process imports first (plugins registered by import)


def lock_who(cells: list[CellSpec], suite_source: str) -> dict[str, Any]:
    c = cells[0]
    more = f" (+{len(cells) - 1} cells)" if len(cells) > 1 else ""
    return {"suite": os.path.basename(suite_source) or suite_source,
            "cell": f"{c.model.name} | {c.method.label()} | {c.task.label()}{more}",
            "run_ids": [x.run_id for x in cells]}


def acquire(lock, exclusive: bool, who: dict[str, Any], timeout: float | None) -> Iterator[tuple]:
    """Take the machine lock; while it is busy, yield ("waiting", info) events (raises LockTimeout)."""
    for info in lock.wait(exclusive, who, timeout):
        yield ("waiting", {**info, "run_ids": who["run_ids"]})
