"""What a group of cells asks of a machine, what this machine has, and the node lock.

A group's request comes from the suite's hardware: ``threads`` CPUs, one GPU for
``device: cuda``, ``memory_gb`` of memory (none reserved when unset), raised to what its
method steps declare (``Method.resources``). A group whose task is timed asks for the whole
node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from slimbench.errors import SuiteError
from slimbench.specs import CellSpec

GIB = 2**30


@dataclass(frozen=True)
class Resources:
    cpus: float = 1
    gpus: float = 0
    memory_bytes: int = 0  # 0: no reservation (the worker's memory limit still applies)
    exclusive: bool = False  # a timed cell: nothing else may run on its node meanwhile

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU(s)"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU(s)")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / GIB:.1f} GiB memory")
        if self.exclusive:
            parts.append("the whole node (timed task)")
        return ", ".join(parts)


def cell_is_timed(cell: CellSpec) -> bool:
    from slimbench.registry import TASKS

    return cell.task.name in TASKS and TASKS.get(cell.task.name).timed


def method_needs(cell: CellSpec) -> dict[str, float]:
    """The largest of each request the group's method steps declare (``Method.resources``)."""
    from slimbench.registry import METHODS

    need: dict[str, float] = {}
    for step in cell.method.steps:
        declared = getattr(METHODS.get(step.name), "resources", None) if step.name in METHODS else None
        for key, value in (declared or {}).items():
            need[key] = max(need.get(key, 0), float(value))
    return need


def group_resources(cells: list[CellSpec]) -> Resources:
    hw = cells[0].hardware
    need = method_needs(cells[0])
    cpus = hw.cpus  # the threads a cell sets are the CPUs it keeps busy
    memory_gb = max(hw.memory_gb or 0, need.get("memory_gb", 0))
    return Resources(
        cpus=max(cpus, need.get("cpus", 0)),
        gpus=max(1 if hw.device == "cuda" else 0, need.get("gpus", 0)),
        memory_bytes=int(memory_gb * 1e9),
        exclusive=any(cell_is_timed(c) for c in cells),
    )


def unit_resources(cells: list[CellSpec]) -> Resources:
    """A unit of several groups (run one after another, models of a timed block held together): the
    largest request of its groups, exclusive if any is timed."""
    groups: dict[str, list[CellSpec]] = {}
    for c in cells:
        groups.setdefault(c.model.model_dump_json() + c.method.model_dump_json() + c.hardware.model_dump_json(),
                          []).append(c)
    reqs = [group_resources(g) for g in groups.values()]
    return Resources(cpus=max(r.cpus for r in reqs), gpus=max(r.gpus for r in reqs),
                     memory_bytes=max(r.memory_bytes for r in reqs), exclusive=any(r.exclusive for r in reqs))


@dataclass(frozen=True)
class Machine:
    cpus: int
    gpus: int
    memory_bytes: int

    @classmethod
    def this(cls) -> Machine:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(cpus=cpus, gpus=gpus, memory_bytes=psutil.virtual_memory().total)

    def refusal(self, req: Resources) -> str | None:
        """Why this machine can never run a group asking for ``req`` (None if it can)."""
        if req.cpus > self.cpus:
            return f"it asks for {req.cpus:g} CPUs (hardware.threads) and this machine has {self.cpus}"
        if req.gpus > self.gpus:
            return f"it asks for {req.gpus:g} GPU(s) and this machine has {self.gpus}"
        if req.memory_bytes > self.memory_bytes:
            return (
                f"it asks for {req.memory_bytes / GIB:.1f} GiB (hardware.memory_gb, or its method) "
                f"and this machine has {self.memory_bytes / GIB:.1f} GiB"
            )
        return None


def check_machine(groups: list[list[CellSpec]], machine: Machine) -> None:
    """One clear error, before anything runs, for a group this machine cannot satisfy."""
    for cells in groups:
        why = machine.refusal(unit_resources(cells))
        if why:
            c = cells[0]
            raise SuiteError(
                f"cannot run {c.model.name} | {c.method.label()} on this machine: {why}. "
                "Lower the request in the suite's hardware, or run it with --executor ray on a cluster that has it"
            )


def default_memory_limit(workers: int) -> int:
    """Per worker: 90% of this machine's RAM shared by the workers, so the sum stays below it."""
    return int(0.9 * psutil.virtual_memory().total / max(1, workers))


# -- the node lock (slimbench.sweep.executors.node_lock) ----------------------------------------
from slimbench.sweep.executors.node_lock import NodeLock, node_lock, node_lock_path  # noqa: E402,F401 - re-exported


# -- the memory guard ---------------------------------------------------------------------------
class MemoryLimitExceeded(Exception):
    pass


def memory_message(limit: int, rss: int) -> str:
    return (
        f"the cell exceeded the memory limit of {limit / GIB:.2f} GiB (resident memory reached {rss / GIB:.2f} GiB); "
        "set a higher limit with --memory-limit or hardware.memory_gb if the machine has it"
    )


class MemoryGuard:
    """Stop the block it guards when this process' resident memory exceeds ``limit`` bytes.

    A sampling thread interrupts the main thread (as Ctrl-C would) and the interruption
    leaves the block as ``MemoryLimitExceeded``, which the runner turns into a failed record.
    It cannot stop a single huge allocation inside one C call; worker processes are also
    watched from outside by their driver, which kills one that goes past the limit.
    Inactive without a limit or off the main thread (the interruption would hit the wrong one).
    Inside the block SIGINT gets Python's default handler (Ctrl-C: KeyboardInterrupt), whatever
    a library installed before (it is restored after): the interruption is delivered through it.
    """

    def __init__(self, limit: int | None, interval: float = 0.05):
        self.limit = limit
        self.interval = interval
        self.tripped: int | None = None

    def _active(self) -> bool:
        import signal
        import threading

        # a handler installed from outside Python (None) could not be put back afterwards
        return bool(self.limit) and threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is not None
        )

    def _sample(self) -> None:
        import _thread

        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            rss = proc.memory_info().rss
            if rss > self.limit:
                with self._lock:
                    if self._armed:
                        self._armed = False
                        self.tripped = rss
                        _thread.interrupt_main()
                return

    def __enter__(self) -> MemoryGuard:
        import signal
        import threading

        self.tripped = None
        self._on = self._active()
        if self._on:
            self._saved_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
            self._armed = True
            self._lock = threading.Lock()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="slimbench-memory-guard", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._on:
            return False
        import signal

        with self._lock:
            self._armed = False
        self._stop.set()
        self._thread.join()
        try:
            return self._finish(exc_type)
        finally:  # after any pending interruption has landed
            signal.signal(signal.SIGINT, self._saved_sigint)

    def _finish(self, exc_type) -> bool:
        import time

        if self.tripped is None:
            return False
        if exc_type is not KeyboardInterrupt:
            # The interruption is on its way (the block ended just as the limit was crossed):
            # let it land here, not in the caller.
            try:
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    time.sleep(0.001)
            except KeyboardInterrupt:
                pass
        raise MemoryLimitExceeded(memory_message(self.limit, self.tripped)) from None
