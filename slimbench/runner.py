"""The runner: cells -> load model -> apply method -> evaluate tasks -> records.

Cells that share a model and a method config form a group: the model is loaded and
compressed once, then every task of the group is evaluated on it (compress once, evaluate
many). A cell that already has an ``ok`` record is skipped. Anything that raises inside a
group becomes ``failed`` records for the affected cells; the sweep goes on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

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
)
from slimbench.models import resolve
from slimbench.registry import METHODS, TASKS
from slimbench.specs import CellSpec, MethodSpec
from slimbench.store import ResultStore, utc_now
from slimbench.task import TaskContext


@dataclass
class RunSummary:
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def load_model(cell: CellSpec) -> LanguageModel:
    resolve_threads(cell.hardware)  # sets torch's thread count; "auto" probes the fastest now
    loader = resolve(cell.model, source="suite", field="models")
    lm = loader(cell.model, cell.hardware)
    lm.spec = cell.model  # tasks that need the uncompressed model (fidelity) reload it from this
    return lm


# -- applying a method ---------------------------------------------------------------------
def apply_method(lm: LanguageModel, spec: MethodSpec, hw, progress=None) -> dict[str, Any]:
    """Apply every step, then measure what was achieved: the method report of the record."""
    storage: dict[str, dict[str, torch.Tensor]] = {}
    steps, execution = [], "native"
    t0 = time.perf_counter()
    with PeakMemory(lm.device) as mem:
        for step in spec.steps:
            method = METHODS.get(step.name)
            cfg = build_config(method.config, step.params, source="record", field=step.name)
            if method.check is not None:
                method.check(lm, cfg)
            torch.manual_seed(0)
            ctx = MethodContext(hardware=hw, progress=progress)
            t_step = time.perf_counter()
            rep: MethodReport = method.apply(lm, cfg, ctx)
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
    return {
        "execution": execution,
        "steps": steps,
        "warnings": [f"{s['name']}: {w}" for s in steps for w in s["warnings"]],
        "compress_seconds": seconds,
        "compress_peak_memory_mb": mem.peak_bytes / 2**20,
        "compress_memory_kind": mem.kind,
        **size_report(lm.model, storage),
    }


def size_report(model: torch.nn.Module, storage: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Parameters, bytes in memory, bytes of the stored form, effective bits, sparsity."""
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


def failure(exc: BaseException, stage: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def evaluate_cell(lm: LanguageModel, cell: CellSpec, method_report: dict, progress) -> tuple[dict, dict]:
    task = TASKS.get(cell.task.name)
    cfg = build_config(task.config, cell.task.params, source="record", field=cell.task.name)
    torch.manual_seed(0)
    result = task.evaluate(lm, cfg, TaskContext(hardware=cell.hardware, method_report=method_report, progress=progress))
    return {k: m.to_dict() for k, m in result.metrics.items()}, result.details


# -- the sweep -------------------------------------------------------------------------------
def group_cells(cells: list[CellSpec]) -> dict[tuple[str, str, str], list[CellSpec]]:
    groups: dict[tuple[str, str, str], list[CellSpec]] = {}
    for c in cells:
        key = (c.model.model_dump_json(), c.method.model_dump_json(), c.hardware.model_dump_json())
        groups.setdefault(key, []).append(c)
    return groups


def run_group(
    pending: list[CellSpec],
    store: ResultStore,
    suite_source: str,
    env: dict,
    *,
    progress=None,
    on_cell: Callable[[CellSpec, str], None] = lambda c, status: None,
    log: Callable[[str], None] = print,
) -> None:
    """Load, compress once, evaluate every pending cell of one (model, method, hardware) group."""
    head = pending[0]
    lm, method_report, stage = None, None, "load"
    started = utc_now()
    try:
        lm = load_model(head)
        stage = "compress"
        method_report = apply_method(lm, head.method, head.hardware, progress)
    except Exception as exc:  # a failing cell becomes a record, never a crashed sweep
        err = failure(exc, stage)
        log(f"FAILED {head.model.name} | {head.method.label()} ({stage}): {type(exc).__name__}: {exc}")
        for c in pending:
            write_record(store, c, suite_source, env, lm, "failed", started, error=err)
            on_cell(c, "failed")
        return
    release_memory()  # what compression freed should not count as inference memory
    for c in pending:
        started = utc_now()
        try:
            metrics, details = evaluate_cell(lm, c, method_report, progress)
            write_record(store, c, suite_source, env, lm, "ok", started, metrics, details, method_report)
            on_cell(c, "ok")
        except Exception as exc:  # likewise for one task
            log(f"FAILED {c.model.name} | {c.method.label()} | {c.task.name}: {type(exc).__name__}: {exc}")
            err = failure(exc, "evaluate")
            write_record(store, c, suite_source, env, lm, "failed", started, report=method_report, error=err)
            on_cell(c, "failed")


def _isolated_worker(cells_json: list[str], root: str, suite_source: str, env: dict) -> None:
    cells = [CellSpec.model_validate_json(j) for j in cells_json]
    run_group(cells, ResultStore(root), suite_source, env, log=lambda s: print(s, flush=True))


def run_group_isolated(
    pending: list[CellSpec], store: ResultStore, suite_source: str, env: dict, timeout: float | None, log
) -> None:
    """The same group in a fresh process: its memory is its own, and a hang can be cut off."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(
        target=_isolated_worker, args=([c.model_dump_json() for c in pending], str(store.root), suite_source, env)
    )
    started = utc_now()
    proc.start()
    proc.join(timeout)
    timed_out = proc.is_alive()
    if timed_out:
        proc.kill()
        proc.join()
    reason = (
        f"the group exceeded its timeout of {timeout} s and was killed"
        if timed_out
        else f"the worker process exited with code {proc.exitcode} before writing a record"
    )
    written = {r["run_id"] for r in store.records(include_failed=True) if r.get("started_at", "") >= started}
    for c in pending:  # cells the worker did not get to (timeout, crash) still get a record
        if c.run_id not in written:
            log(f"FAILED {c.model.name} | {c.method.label()} | {c.task.name}: {reason}")
            err = {"stage": "isolation", "type": "Timeout" if timed_out else "WorkerDied", "message": reason}
            write_record(store, c, suite_source, env, None, "failed", started, error=err)


def run_cells(
    cells: list[CellSpec],
    store: ResultStore,
    *,
    suite_source: str = "",
    show_progress: bool = True,
    isolate: bool = False,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Run every cell without an ok record; in-process, or one process per group (``isolate``)."""
    summary = RunSummary()
    env = environment()
    bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not show_progress)
    inner = (lambda **kw: tqdm(leave=False, disable=not show_progress, **kw)) if show_progress else None
    for group in group_cells(cells).values():
        pending = [c for c in group if not store.has_ok(c.run_id)]
        summary.skipped += [c.run_id for c in group if c not in pending]
        bar.update(len(group) - len(pending))
        if not pending:
            continue
        bar.set_postfix_str(f"{pending[0].model.name} | {pending[0].method.label()}"[:60])
        if isolate:
            run_group_isolated(pending, store, suite_source, env, timeout, log)
            for c in pending:
                (summary.ok if store.has_ok(c.run_id) else summary.failed).append(c.run_id)
            bar.update(len(pending))
        else:

            def on_cell(c: CellSpec, status: str) -> None:
                (summary.ok if status == "ok" else summary.failed).append(c.run_id)
                bar.update(1)

            run_group(pending, store, suite_source, env, progress=inner, on_cell=on_cell, log=log)
            release_memory()
    bar.close()
    return summary


def write_record(
    store, cell, suite_source, env, lm, status, started, metrics=None, details=None, report=None, error=None
):
    rec = base_record(cell, suite_source, env, lm)
    rec.update(
        status=status,
        error=error,
        metrics=metrics or {},
        task_details=details or {},
        method_report=report,
        started_at=started,
        finished_at=utc_now(),
    )
    store.write(rec)
