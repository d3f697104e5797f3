"""Peak memory of a timed cell, read in a fresh process that holds only its model.

A sweep's process holds more than the model it measures: what compression left behind, the
other models of an interleaved comparison. So the memory of a timed cell that can take one
(its task has a ``session``) is read in a child forked from a server process (multiprocessing's
``forkserver``) that imported torch, transformers and SlimBench and never loaded a model: the
child loads the cell's model, reloaded from the
artifact cache (or the base model for an unchanged one, or compressed again when that is
cheap), frees what loading left, and reads one untimed generation (the session's
``memory()``). Forking from the server costs milliseconds, not a fresh interpreter's seconds.

Where that cannot be done (an execution path that takes long to rebuild, such as a compiled
one, without a reusable artifact; a plugin the child cannot import; any failure in the child),
:func:`probe` says why and the task reads the memory in the sweep's process instead, saying so
(slimbench.measure.memory).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any

from slimbench.specs import CellSpec

REBUILD_LIMIT_S = 20.0  # compress again in the child only when the first compression took less
TIMEOUT_S = 600.0
ENV_OFF = "SLIMBENCH_MEMORY_PROBE"  # "off": always read in the sweep's process


_CONTEXT = None


def context():
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        # imported once by the server (torch, transformers, loaders, methods API): children start warm
        ctx.set_forkserver_preload(["slimbench.sweep.probe_server"])
        _CONTEXT = ctx
    return _CONTEXT


def rebuild_plan(report: dict[str, Any]) -> tuple[str | None, str | None]:
    """(how the child gets the model, None) or (None, why it cannot) from the group's method report."""
    art = report.get("artifact") or {}
    if art.get("reused") or art.get("saved"):
        return "reloaded from the artifact cache", None
    if art.get("nothing_to_cache"):
        return "the unchanged model, loaded", None
    seconds = float(report.get("compress_seconds") or 0.0)
    if seconds <= REBUILD_LIMIT_S:
        return f"loaded and compressed again ({seconds:.1f} s the first time)", None
    why = art.get("reason") or "no artifact"
    return None, (f"rebuilding it would take about {seconds:.0f} s ({why}): read in the sweep's process, "
                  "beside what else it held")


def _child(conn, cell_json: str, env: dict[str, str], preload: tuple[str, ...], how: str) -> None:
    try:
        os.environ.update(env)
        import importlib

        for module in preload:  # plugins registered by import (tests, notebooks)
            importlib.import_module(module)
        from slimbench.config import build_config
        from slimbench.measure import memory
        from slimbench.measure.clocks import release_memory
        from slimbench.registry import TASKS
        from slimbench.sweep.cellrun import load_and_compress
        from slimbench.task import TaskContext

        release_memory()
        before_load = memory.note_runtime()
        cell = CellSpec.model_validate_json(cell_json)
        lm, report = load_and_compress(cell, log=lambda s: None)
        release_memory()  # what loading or compressing freed
        task = TASKS.get(cell.task.name)
        cfg = build_config(task.config, cell.task.params, source="record", field=cell.task.name)
        session = task.session(lm, cfg, TaskContext(hardware=cell.hardware, method_report=report))
        reading = session.memory()
        reading.update(runtime=None, before_load=before_load, isolation="fresh process", loaded=how)
        conn.send(("ok", reading))
    except BaseException as exc:  # everything goes back as a reason: the parent falls back
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()[-2000:]))
    finally:
        conn.close()


def probe(cell: CellSpec, report: dict[str, Any], preload: tuple[str, ...] = ()) -> tuple[dict | None, str | None]:
    """(a memory reading from a fresh process, None) or (None, why the sweep's process reads it)."""
    if os.environ.get(ENV_OFF, "").lower() in ("off", "0", "no", "false"):
        return None, f"${ENV_OFF} is off"
    how, why = rebuild_plan(report)
    if how is None:
        return None, why
    ctx = context()
    parent, child = ctx.Pipe(duplex=False)
    env = {k: v for k, v in os.environ.items() if k.startswith(("SLIMBENCH_", "HF_", "TRANSFORMERS_"))}
    proc = ctx.Process(target=_child, args=(child, cell.model_dump_json(), env, preload, how), daemon=True)
    try:
        proc.start()
    except Exception as exc:  # no fork server here (not Linux, no /dev/shm): read in this process
        return None, f"no fresh process could be started ({type(exc).__name__}: {exc})"
    child.close()
    try:
        if not parent.poll(TIMEOUT_S):
            return None, f"the fresh process did not answer within {TIMEOUT_S:g} s"
        answer = parent.recv()
    except (EOFError, OSError):
        return None, f"the fresh process died ({proc.exitcode})"
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    if answer[0] == "ok":
        return answer[1], None
    return None, f"the fresh process failed ({answer[1]})"
