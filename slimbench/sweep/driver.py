"""The driver of a sweep: claim cells, hand groups to an executor, write every record.

Whatever executes the groups (this process, worker processes, Ray tasks), records come back
here and are written by this one process, so they are identical whichever executor ran
them. Before a group is handed out its cells are claimed in the results folder; a cell that
another driver holds is left to it and waited for (and taken over if that driver dies).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from slimbench.specs import CellSpec
from slimbench.sweep.cell_claims import TIMEOUT_S, ClaimBook
from slimbench.sweep.executors import LocalExecutor
from slimbench.sweep.executors.resources import Resources, unit_resources
from slimbench.sweep.runner import RunOptions, lock_timed_out, make_record, units_of
from slimbench.sweep.status import CostModel, ProgressFile, eta_seconds, human_seconds
from slimbench.sweep.store import ResultStore, utc_now

# tqdm puts ", " before a non-empty postfix itself: "[03:38, ETA ~2 min]", or "[03:38]" without one
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


@dataclass
class RunSummary:
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # had an ok record before the run
    elsewhere: list[str] = field(default_factory=list)  # finished by another driver during the run


@dataclass
class _Running:
    cells: list[CellSpec]
    req: Resources
    started: str
    written: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)  # "load:<run id>", "compress:<run id>" and evaluated run ids
    last_event: float = field(default_factory=time.monotonic)
    waiting: dict | None = None  # what its worker waits for (the machine lock), while it waits
    active: set[str] = field(default_factory=set)  # the cells the stage in progress works on (the rest: queued)


class Sweep:
    def __init__(self, cells, store: ResultStore, executor, *, suite_source, show_progress, log, claim_timeout,
                 options: RunOptions | None = None):
        self.options = options or RunOptions()
        executor.options = self.options  # what every worker runs its cells with
        self.cells = cells
        self.by_id = {c.run_id: c for c in cells}
        self.store = store
        self.executor = executor
        self.suite_source = suite_source
        self.log = log
        self.summary = RunSummary()
        self.book = ClaimBook(store, timeout=claim_timeout)
        self.queue: deque[list[CellSpec]] = deque()
        self.foreign: list[CellSpec] = []
        self.running: dict[int, _Running] = {}
        self.next_gid = 0
        self.t0 = utc_now()
        self.cost = CostModel()
        self.show_progress = show_progress
        self.bar = None
        self.progress_file = ProgressFile(store)

    # -- planning ----------------------------------------------------------------------------
    def plan(self) -> None:
        done = {c.run_id for c in self.cells if self.store.has_ok(c.run_id)}
        self.summary.skipped += [c.run_id for c in self.cells if c.run_id in done]
        # a unit: one group, or the groups whose timed cells a report compares (measured interleaved)
        self.queue.extend(units_of([c for c in self.cells if c.run_id not in done], interleave=self.options.interleave))

    def dispatch(self) -> None:
        for _ in range(len(self.queue)):
            group = self.queue.popleft()
            req = unit_resources(group)
            if not self.executor.has_room(req):
                self.queue.append(group)
                continue
            claimed = []
            for c in group:
                state, owner = self.book.try_claim(c.run_id, label=f"{c.model.name} | {c.method.label()}")
                if state == "claimed":
                    claimed.append(c)
                elif state == "done":
                    self.finished_elsewhere(c)
                else:
                    if not self.foreign:
                        self.log(f"cells held by another run ({owner.describe()}): waiting for them")
                    self.foreign.append(c)
            if claimed:
                gid, self.next_gid = self.next_gid, self.next_gid + 1
                self.running[gid] = _Running(claimed, req, utc_now())
                self.executor.submit(gid, claimed, req, self.suite_source)

    # -- events ------------------------------------------------------------------------------
    def handle(self, gid: int, event: tuple) -> None:
        run = self.running.get(gid)
        if run is None:
            return
        kind = event[0]
        if kind == "waiting":  # the worker waits for the machine lock: said on the bar and to `status`
            run.waiting = event[1]
            run.last_event = time.monotonic()  # waiting is not progress: the stage's clock starts when it ends
            return
        run.waiting = None
        if kind == "begin":
            run.active = set(event[1])
        if kind == "progress":
            return
        run.last_event = time.monotonic()
        if kind == "stage":
            _, stage, run_id, seconds = event
            cell = self.by_id.get(run_id) or run.cells[0]
            self.cost.add(stage, cell, seconds)
            run.done.add(run_id if stage == "evaluate" else f"{stage}:{run_id}")
        elif kind == "record":
            if lock_timed_out(event) and self.options.lock_timeout:
                # the wait was bounded once: units handed out later only try the lock, never wait that long again
                self.options = replace(self.options, lock_timeout=0.0)
                self.executor.options = self.options
            self.write(run, event[1])
        elif kind == "end":
            reason = event[1] or {"type": "WorkerDied", "message": "the group ended without a record for this cell"}
            for c in run.cells:
                if c.run_id not in run.written:
                    err = {"stage": "worker", **reason}
                    self.write(run, make_record(c, self.suite_source, None, "failed", run.started, error=err))
            del self.running[gid]

    def write(self, run: _Running, rec: dict) -> None:
        run_id = rec["run_id"]
        cell = self.by_id.get(run_id)
        try:
            self.store.write(rec)
        except FileExistsError:  # a driver judged dead but alive finished it too: its record stands
            self.log(f"note: {run_id} was finished by another run meanwhile; its record is kept")
            self.summary.elsewhere.append(run_id)
        else:
            if rec["status"] == "ok":
                self.summary.ok.append(run_id)
            else:
                self.summary.failed.append(run_id)
                e = rec.get("error") or {}
                where = f"{cell.model.name} | {cell.method.label()} | {cell.task.name}" if cell else run_id
                self.log(f"FAILED {where} ({e.get('stage')}): {e.get('type')}: {e.get('message')}")
        run.written.add(run_id)
        self.book.release(run_id)
        self.advance()

    def finished_elsewhere(self, cell: CellSpec) -> None:
        self.summary.elsewhere.append(cell.run_id)
        self.advance()

    def recheck_foreign(self) -> None:
        """Cells another driver held: done there, failed there, or to take over (it died)."""
        waiting, again = [], []
        for c in self.foreign:
            if self.store.has_ok(c.run_id):
                self.finished_elsewhere(c)
            elif self.book.current(c.run_id) is not None:
                waiting.append(c)
            elif any(r.get("finished_at", "") >= self.t0 for r in self.store.failed_attempts(c.run_id)):
                self.summary.failed.append(c.run_id)  # it failed there during this run: not tried twice
                self.advance()
            else:
                again.append(c)  # its owner is gone: claim it again
        self.foreign = waiting
        self.queue.extend(units_of(again, interleave=self.options.interleave))

    # -- progress ----------------------------------------------------------------------------
    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self.postfix(), refresh=False)

    def eta(self) -> float | None:
        """Seconds left, per worker (slimbench.sweep.status.eta_seconds: the model `status` uses too)."""
        now = time.monotonic()
        running = [self.cost.unit_seconds(r.cells, done=r.done, elapsed=now - r.last_event)
                   for r in self.running.values()]
        queued = [self.cost.unit_seconds(g) for g in self.queue]
        if not running and not queued:
            return None
        return eta_seconds(running, queued, getattr(self.executor, "slots", 1))

    def waiting_texts(self) -> list[str]:
        return [r.waiting["text"] for r in self.running.values() if r.waiting]

    def postfix(self) -> str:
        waits = self.waiting_texts()
        if waits:  # the ETA means nothing while a worker waits on another run
            return waits[0] + (f" (+{len(waits) - 1} more waiting)" if len(waits) > 1 else "")
        eta = self.eta()
        workers = getattr(self.executor, "slots", 1)
        return "" if eta is None else f"ETA ~{human_seconds(eta)}" + (f" ({workers} workers)" if workers > 1 else "")

    def publish(self) -> None:
        """The bar's state, for `status` (one small file per live driver)."""
        self.progress_file.write(eta=self.eta(), workers=getattr(self.executor, "slots", 1),
                                 waiting={rid: r.waiting["text"] for r in self.running.values() if r.waiting
                                          for rid in r.waiting.get("run_ids", [])},
                                 active=sorted(rid for r in self.running.values() for rid in r.active),
                                 cells_left=sum(len(u) for u in self.queue)
                                 + sum(len(r.cells) - len(r.written) for r in self.running.values()))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        self.plan()
        if not self.queue:
            return self.summary  # nothing to do: no executor, no model, no claim
        self.executor.start()  # may fail (an unreachable cluster): before anything is written
        self.store.runs.mkdir(parents=True, exist_ok=True)
        self.store.clean_temporary()
        self.cost = CostModel.from_records(self.store.history())
        self.bar = tqdm(
            total=len(self.cells),
            initial=len(self.summary.skipped),
            desc="cells",
            unit="cell",
            disable=not self.show_progress,
            bar_format=BAR_FORMAT,
        )
        if self.show_progress and hasattr(self.executor, "progress"):
            self.executor.progress = lambda **kw: tqdm(leave=False, **kw)
        last_check = last_publish = 0.0
        try:
            with self.book:
                while self.queue or self.running or self.foreign:
                    self.dispatch()
                    events = self.executor.poll(0.5)
                    for gid, event in events:
                        self.handle(gid, event)
                    if self.foreign and time.monotonic() - last_check > 1.0:
                        last_check = time.monotonic()
                        self.recheck_foreign()
                    if not events and not self.running:
                        time.sleep(0.2)  # only others' cells left, or nothing fits yet
                    self.bar.set_postfix_str(self.postfix())
                    if time.monotonic() - last_publish > 2.0:
                        last_publish = time.monotonic()
                        self.publish()
        finally:
            self.executor.close()
            self.bar.close()
            self.progress_file.remove()
        return self.summary


def sweep(
    cells: list[CellSpec],
    store: ResultStore,
    executor,
    *,
    suite_source: str = "",
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    claim_timeout: float = TIMEOUT_S,
    options: RunOptions | None = None,
) -> RunSummary:
    """Run every cell of ``cells`` without an ok record on ``executor``; write the records."""
    return Sweep(
        cells,
        store,
        executor,
        suite_source=suite_source,
        show_progress=show_progress,
        log=log,
        claim_timeout=claim_timeout,
        options=options,
    ).run()


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
    options: RunOptions | None = None,
):
    """Run every cell without an ok record and write its record; returns a RunSummary.

    ``executor``: where groups run (default: this process, one group after another; with
    ``isolate`` or a ``timeout``, one fresh worker process per group).
    """
    if executor is None:
        workers = 1 if (isolate or timeout is not None) else None
        executor = LocalExecutor(workers=workers, isolate=isolate, timeout=timeout, memory_limit=memory_limit)
    return sweep(cells, store, executor, suite_source=suite_source, show_progress=show_progress, log=log,
                 options=options)
