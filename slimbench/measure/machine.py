"""The state of the machine around a timed block, and the thread count a cell runs with.

:func:`snapshot` (load average, affinity, thread counts), :class:`Contention` (CPU time other
processes took on our cores during a block) and :func:`resolve_threads` (the ``threads: auto``
hardware setting: probe each thread count now, keep the fastest). The machine's limits (the
roofline's denominators) are in :mod:`slimbench.measure.limits`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

# Above this many cores' worth of CPU time taken by other processes, a measurement is "loaded".
DEFAULT_LOAD_THRESHOLD = 0.25


# -- the state of the machine --------------------------------------------------------------
def affinity() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def snapshot() -> dict[str, Any]:
    """Load average, CPU affinity and thread counts now (recorded before/after each timed block)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "time": time.time(),
        "loadavg": load,
        "affinity": affinity(),
        "process_threads": psutil.Process().num_threads(),
        "torch_threads": torch.get_num_threads(),
    }


# Processes that carry out the measured work itself (an engine's worker processes, e.g.
# pipeline stages): their CPU time is the measurement's own, not contention.
_MEASURED_PIDS: set[int] = set()


def add_measured_pids(pids: list[int]) -> None:
    _MEASURED_PIDS.update(pids)


def remove_measured_pids(pids: list[int]) -> None:
    _MEASURED_PIDS.difference_update(pids)


class Contention:
    """CPU time that *other* processes took on this process' cores while the block ran.

    ``other_cores``: busy time of the affinity cores (from /proc/stat via psutil) minus the
    measurement's own CPU time, over the wall time: 0 on an idle machine, 1.0 when another
    process kept one whole core busy. Own time is this process' and that of the worker processes
    that do the measured work with it (registered with :func:`add_measured_pids`: parallel
    workers, engine processes), their own child processes included. Compiler workers this process
    started count as other processes: they compete for the same cores.
    Resolution is the kernel's tick (10 ms).
    """

    def __init__(self) -> None:
        self.other_cores = 0.0
        self.wall = 0.0
        self.own_cpu = 0.0  # seconds of CPU the measurement itself used

    @staticmethod
    def _busy(cpus: list[int]) -> float:
        per = psutil.cpu_times(percpu=True)
        total = 0.0
        for i in cpus:
            if i < len(per):
                t = per[i]
                total += sum(t) - t.idle - getattr(t, "iowait", 0.0)
        return total

    @staticmethod
    def _own(pids: list[int]) -> dict[int | None, float]:
        procs: list[tuple[int | None, psutil.Process]] = []
        for pid in [None, *pids]:
            try:
                proc = psutil.Process(pid)
                procs.append((pid, proc))
                if pid is not None:  # a measured worker's own processes (an engine's core) do its work
                    procs.extend((c.pid, c) for c in proc.children(recursive=True))
            except psutil.Error:  # gone: it contributes nothing to measure
                continue
        out: dict[int | None, float] = {}
        for key, proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            out[key] = t.user + t.system
        return out

    def __enter__(self) -> Contention:
        self._cpus, self._pids = affinity(), sorted(_MEASURED_PIDS)
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(self._cpus), self._own(self._pids)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        own1 = self._own(self._pids)
        # only processes alive at both ends: a worker that exited took its CPU time with it
        self.own_cpu = sum(own1[p] - t for p, t in self._own0.items() if p in own1)
        other = (self._busy(self._cpus) - self._busy0) - self.own_cpu
        # (over a block of a few ticks the kernel's 10 ms resolution can exceed the cores we have)
        self.other_cores = min(float(len(self._cpus)), max(0.0, other) / self.wall) if self.wall > 0 else 0.0


# -- threads: auto ---------------------------------------------------------------------------
_LAST_THREADS: dict[str, Any] = {}


def thread_candidates(n_cpus: int) -> list[int]:
    """1, 2, 4, ... up to the CPUs we may use, and that count itself."""
    out, c = [], 1
    while c < n_cpus:
        out.append(c)
        c *= 2
    return [*out, n_cpus]


def _probe_workload() -> Callable[[], None]:
    """Many small parallel kernels (decode-like) and one larger product (prefill-like).

    OpenMP barriers are what collapse under contention, so the probe is dominated by short
    kernels, the way single-token decoding is.
    """
    g = torch.Generator().manual_seed(0)
    x1, x64 = torch.randn(1, 576, generator=g), torch.randn(64, 576, generator=g)
    w = torch.randn(1536, 576, generator=g)

    def run() -> None:
        for _ in range(40):
            torch.nn.functional.linear(x1, w)
        torch.nn.functional.linear(x64, w)

    return run


def probe_threads(candidates: list[int], rounds: int = 5) -> dict[int, float]:
    """Median seconds of the probe workload per thread count, candidates interleaved per round."""
    work = _probe_workload()
    times: dict[int, list[float]] = {c: [] for c in candidates}
    before = torch.get_num_threads()
    try:
        for r in range(rounds):
            order = candidates if r % 2 == 0 else candidates[::-1]  # A/B/B/A: drift hits both
            for c in order:
                torch.set_num_threads(c)
                work()  # settle the new thread pool
                t0 = time.perf_counter()
                work()
                times[c].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {c: statistics.median(v) for c, v in times.items()}


THREADS_CAP_ENV = "SLIMBENCH_MAX_THREADS"


def thread_cap() -> int | None:
    """An upper bound on intra-op threads from the environment (None: no bound). Parallel test
    workers set 1, so two workers on two cores do not each ask for both."""
    raw = os.environ.get(THREADS_CAP_ENV, "").strip()
    return max(1, int(raw)) if raw.isdigit() else None


def resolve_threads(hw: Any) -> int:
    """The intra-op thread count for ``hw`` (a HardwareSpec), set in torch and returned.

    An int is used as given. ``"auto"`` probes every candidate count now (A/B interleaved
    rounds of a decode-like workload) and keeps the fastest: with another process on a 2-core
    machine that is often 1 thread, on an idle one all cores. The choice and the probe's
    timings are kept for the cell's record (:func:`last_thread_choice`).
    """
    setting = getattr(hw, "threads", hw)
    cap = thread_cap()
    if setting != "auto":
        n = min(int(setting), cap or int(setting))
        torch.set_num_threads(n)
        _LAST_THREADS.clear()
        capped = {"capped_by": THREADS_CAP_ENV} if n < int(setting) else {}
        _LAST_THREADS.update({"setting": int(setting), "used": n, **capped})
        return n
    cands = [c for c in thread_candidates(len(affinity())) if not cap or c <= cap] or [1]
    with Contention() as c:
        timing = probe_threads(cands) if len(cands) > 1 else {cands[0]: 0.0}
    best = min(timing, key=timing.get)
    torch.set_num_threads(best)
    _LAST_THREADS.clear()
    _LAST_THREADS.update({
        "setting": "auto", "used": best,
        "probe_ms": {str(k): round(v * 1e3, 3) for k, v in timing.items()},
        "probe": "40 x linear(1x576, 1536x576) + linear(64x576, 1536x576), median of 5 interleaved rounds",
        "other_cores_during_probe": round(c.other_cores, 3),
    })
    return best


def last_thread_choice() -> dict[str, Any]:
    """How the current thread count was chosen (empty if :func:`resolve_threads` never ran)."""
    out = dict(_LAST_THREADS)
    if out and out.get("used") != torch.get_num_threads():
        out["note"] = f"torch now uses {torch.get_num_threads()} threads"
    return out
