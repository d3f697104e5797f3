"""Executors on this machine: this process, or a pool of worker processes."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import psutil

from slimbench.errors import SuiteError
from slimbench.specs import CellSpec
from slimbench.sweep.executors.resources import (
    Machine,
    Resources,
    check_machine,
    default_memory_limit,
    memory_message,
)


class InProcessExecutor:
    """One group after another in this process: no start-up cost, inner progress bars."""

    name = "local (sequential, in this process)"
    slots = 1

    def __init__(self, memory_limit: int | None = None):
        self.memory_limit = memory_limit
        self.progress = None  # the driver sets a tqdm factory for per-task bars
        self.options = None  # the driver sets the run's options (runner.RunOptions)
        self._current: tuple[int, Any] | None = None

    def check(self, groups: list[list[CellSpec]]) -> None:
        check_machine(groups, Machine.this())

    def start(self) -> None:
        pass

    def has_room(self, req: Resources) -> bool:
        return self._current is None

    def submit(self, gid: int, cells: list[CellSpec], req: Resources, suite_source: str) -> None:
        from slimbench.sweep.runner import iter_group

        limit = req.memory_bytes or self.memory_limit or default_memory_limit(1)
        self._current = (gid, iter_group(cells, suite_source, progress=self.progress, memory_limit=limit,
                                         options=self.options))

    def poll(self, timeout: float) -> list[tuple[int, tuple]]:
        if self._current is None:
            return []
        gid, gen = self._current
        try:
            return [(gid, next(gen))]
        except StopIteration:
            self._current = None
            return [(gid, ("end", None))]

    def close(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None


# -- worker processes ------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its driver: a SIGKILLed driver takes its workers with it.

    Otherwise an orphan would go on computing cells that a rerun takes over.
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the driver died before prctl took effect
        os._exit(1)


def _worker_main(conn, preload: tuple[str, ...], parent_pid: int) -> None:
    from slimbench.zoo.hub import offline_defaults

    _die_with_parent(parent_pid)
    offline_defaults()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the memory guard interrupts like Ctrl-C
    for module in preload:  # plugins registered by import (tests, notebooks)
        importlib.import_module(module)
    from slimbench.measure.clocks import freeze_imports
    from slimbench.sweep.runner import iter_group

    freeze_imports()  # this process's own imports (every method and task too): later collections skip them

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, gid, cells_json, suite_source, limit, options = msg
        cells = [CellSpec.model_validate_json(j) for j in cells_json]
        for event in iter_group(cells, suite_source, memory_limit=limit, options=options):
            conn.send((gid, event))
        conn.send((gid, ("end", None)))


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its children."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def kill_tree(proc: multiprocessing.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    proc.kill()
    proc.join()


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker process was killed by {name} before it finished these cells"
    return f"the worker process exited with code {code} before it finished these cells"


@dataclass
class _Worker:
    proc: multiprocessing.Process
    conn: Any
    gid: int | None = None
    submitted: float = 0.0
    limit: int = 0
    over_since: float | None = None


class WorkerPoolExecutor:
    """``workers`` processes on this machine, each running one group at a time.

    A group starts when a worker is free and the CPUs, GPUs and memory it asks for fit beside
    the groups already running. The driver side watches each worker: past ``timeout`` seconds
    or past its memory limit it is killed and its group's unfinished cells fail, saying why;
    a worker that dies is replaced. With ``isolate`` every group gets a fresh process.
    """

    def __init__(
        self,
        workers: int,
        *,
        isolate: bool = False,
        timeout: float | None = None,
        memory_limit: int | None = None,
        preload: tuple[str, ...] = (),
    ):
        if workers < 1:
            raise SuiteError(f"--workers must be a positive number of processes, got {workers}")
        if timeout is not None and not timeout > 0:
            raise SuiteError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.n = workers
        self.slots = workers
        self.isolate = isolate
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.preload = tuple(preload)
        self.options = None  # the driver sets the run's options (runner.RunOptions)
        self.machine = Machine.this()
        self.workers: list[_Worker] = []
        self.requests: dict[int, Resources] = {}
        self.name = f"local ({workers} worker process{'es' if workers > 1 else ''})"

    def check(self, groups: list[list[CellSpec]]) -> None:
        check_machine(groups, self.machine)

    def start(self) -> None:
        pass

    # -- scheduling ---------------------------------------------------------------------------
    def has_room(self, req: Resources) -> bool:
        busy = [w for w in self.workers if w.gid is not None]
        if len(busy) >= self.n:
            return False
        if not busy:
            return True  # a group the machine can run at all always gets to run alone
        used = [self.requests[w.gid] for w in busy]
        return (
            sum(r.cpus for r in used) + req.cpus <= self.machine.cpus
            and sum(r.gpus for r in used) + req.gpus <= self.machine.gpus
            and sum(r.memory_bytes for r in used) + req.memory_bytes <= self.machine.memory_bytes
        )

    def _spawn(self) -> _Worker:
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_main, args=(child_end, self.preload, os.getpid()), name="slimbench-worker", daemon=False
        )
        proc.start()
        child_end.close()
        worker = _Worker(proc, parent_end)
        self.workers.append(worker)
        return worker

    def submit(self, gid: int, cells: list[CellSpec], req: Resources, suite_source: str) -> None:
        idle = [w for w in self.workers if w.gid is None and w.proc.is_alive()]
        worker = idle[0] if idle else self._spawn()
        worker.gid, worker.submitted, worker.over_since = gid, time.monotonic(), None
        worker.limit = req.memory_bytes or self.memory_limit or default_memory_limit(self.n)
        self.requests[gid] = req
        options = self.options
        if options is not None and self.preload and not options.preload:  # a fresh process imports what workers do
            from dataclasses import replace

            options = replace(options, preload=self.preload)
        worker.conn.send(("run", gid, [c.model_dump_json() for c in cells], suite_source, worker.limit, options))

    # -- events -------------------------------------------------------------------------------
    def poll(self, timeout: float) -> list[tuple[int, tuple]]:
        busy = [w for w in self.workers if w.gid is not None]
        if not busy:
            return []
        waitables = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
        multiprocessing.connection.wait(waitables, timeout=min(timeout, 0.5))
        events: list[tuple[int, tuple]] = []
        for w in busy:
            events += self._drain(w)
            if w.gid is None:
                continue
            reason = self._why_stop(w)
            if reason is not None:
                events.append((w.gid, ("end", reason)))
                self._retire(w)
        return events

    def _drain(self, w: _Worker) -> list[tuple[int, tuple]]:
        out = []
        try:
            while w.conn.poll():
                gid, event = w.conn.recv()
                out.append((gid, event))
                if event[0] == "end":
                    self.requests.pop(gid, None)
                    w.gid = None
                    if self.isolate:
                        self._stop(w)
        except (EOFError, OSError):
            pass  # the process is gone; _why_stop tells why
        return out

    def _why_stop(self, w: _Worker) -> dict[str, str] | None:
        if not w.proc.is_alive():
            w.proc.join()
            return {"type": "WorkerDied", "message": exit_reason(w.proc.exitcode)}
        now = time.monotonic()
        if self.timeout is not None and now - w.submitted > self.timeout:
            kill_tree(w.proc)
            msg = f"the group exceeded its timeout of {self.timeout:g} s and was killed"
            return {"type": "Timeout", "message": msg}
        rss = tree_rss(w.proc.pid)
        if rss > w.limit:
            # The worker's own guard gets a moment to fail the cell cleanly; past that (or far
            # past the limit) the worker is killed.
            w.over_since = w.over_since or now
            if now - w.over_since > 3.0 or rss > 1.25 * w.limit:
                kill_tree(w.proc)
                return {"type": "MemoryLimitExceeded", "message": memory_message(w.limit, rss) + " (worker killed)"}
        else:
            w.over_since = None
        return None

    def _retire(self, w: _Worker) -> None:
        self.requests.pop(w.gid, None)
        w.gid = None
        if w.proc.is_alive():
            kill_tree(w.proc)
        self.workers.remove(w)

    def _stop(self, w: _Worker) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            w.conn.send(("stop",))
        w.proc.join(5)
        if w.proc.is_alive():
            kill_tree(w.proc)
        if w in self.workers:
            self.workers.remove(w)

    def close(self) -> None:
        for w in list(self.workers):
            if w.gid is None:
                self._stop(w)
            else:
                kill_tree(w.proc)
        self.workers.clear()
