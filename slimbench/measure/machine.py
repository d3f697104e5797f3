"""The machine's own limits, and the state of the machine around a timed block.

Limits (measured once per machine and cached as JSON under ``models.cache_dir()/machine``):

- ``bandwidth``: a streaming read, ``torch.sum`` over an fp32 tensor at least 8x the last-level
  cache (256 MiB at least), best of ``repeats``: the bytes/s a memory-bound decoder can hope for
  with this many threads.
- ``flops``: attainable dense matrix-product FLOP/s per dtype (float32, bfloat16, float16 through
  ``F.linear``, the op linear layers run; int8 through ``torch._int_mm``), best of repeats of an
  ``n x n x n`` product, n the smallest of 256, 512, ... whose product takes 20 ms.

The cache key is the CPU model, core count, CPU affinity, thread count, torch version and the
device (GPU name on CUDA): change any and the limits are measured again. A measurement taken
while other processes used the cores (see :class:`Contention`) is flagged ``noisy``; a noisy
cached entry is measured again by the first request that finds the machine quiet, so a bad
number is not inherited forever (and a loaded machine does not pay the measurement every cell).

Hygiene: :func:`snapshot` (load average, affinity, thread counts), :class:`Contention` (CPU
time other processes took on our cores during a block) and :func:`resolve_threads` (the
``threads: auto`` hardware setting: probe each thread count now, keep the fastest).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from slimbench.config import stable_hash
from slimbench.measure.clocks import cpu_name

LIMITS_VERSION = 2  # bump when the measurement changes: old cache files are then ignored
MIN_STREAM_BYTES = 256 * 2**20
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    that do the measured work with it (registered with :func:`add_measured_pids`). Compiler
    workers this process started count as other processes: they compete for the same cores.
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
        out: dict[int | None, float] = {}
        for pid in [None, *pids]:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:  # gone: it contributes nothing to measure
                continue
            out[pid] = t.user + t.system
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
        self.other_cores = max(0.0, other) / self.wall if self.wall > 0 else 0.0


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


# -- limits -------------------------------------------------------------------------------------
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs); 32 MiB when it cannot be read."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float = 3.0) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up; fewer (at least 2) if they exceed ``budget_s``."""
    fn()  # warm-up: page faults, kernel selection
    out: list[float] = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if len(out) >= 2 and time.perf_counter() - t_start > budget_s:
            break  # a slow dtype (fp16 matmul on CPUs without fp16 arithmetic) must not take minutes
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure_bandwidth(device: torch.device | str = "cpu", size_bytes: int | None = None,
                      repeats: int = 7) -> dict[str, Any]:
    """Streaming-read bandwidth: bytes/s of ``torch.sum`` over a tensor far larger than the caches."""
    device = torch.device(device)
    if size_bytes is None:
        size_bytes = 2**30 if device.type == "cuda" else max(MIN_STREAM_BYTES, 8 * last_level_cache_bytes())
    x = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    secs = _best_seconds(lambda: x.sum(), device, repeats)
    mib = size_bytes / 2**20
    return {
        "bytes_per_s": size_bytes / min(secs),
        "method": f"torch.sum over a {mib:.0f} MiB float32 tensor, best of {len(secs)} (after 1 warm-up)",
        "size_bytes": size_bytes,
        "samples_s": secs,
    }


def _matmul_fn(dtype: str, n: int, device: torch.device) -> Callable[[], Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    if dtype == "int8":  # int8 x int8 -> int32, the product dynamic int8 quantization runs
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g).to(device)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g).to(device)
        return lambda: torch._int_mm(a, b)
    # F.linear (x @ W^T), the product every linear layer runs: on this CPU an fp16 `a @ b` takes a
    # path 6x slower than fp16 `linear`, so a plain matmul would understate what models attain.
    x = torch.randn(n, n, generator=g).to(device=device, dtype=DTYPE_NAMES[dtype])
    w = torch.randn(n, n, generator=g).to(device=device, dtype=DTYPE_NAMES[dtype])
    return lambda: torch.nn.functional.linear(x, w)


def product_size(dtype: str, device: torch.device, max_n: int, min_seconds: float = 0.02) -> int:
    """The smallest n (256, 512, ... up to ``max_n``) whose product takes ``min_seconds``: big enough
    to reach the kernel's speed, small enough that a slow dtype (fp16 on a CPU without fp16
    arithmetic) does not take minutes."""
    n = 256
    while n < max_n:
        fn = _matmul_fn(dtype, n, device)
        if min(_best_seconds(fn, device, repeats=3, budget_s=min_seconds)) >= min_seconds:
            break  # (the best of a few calls: one descheduled call must not stop the growth)
        n *= 2
    return n


def measure_flops(dtype: str, device: torch.device | str = "cpu", n: int | None = None,
                  repeats: int = 5) -> dict[str, Any]:
    """Attainable matrix-product FLOP/s for ``dtype``: ``2 n^3`` over the best time of an n x n x n product."""
    device = torch.device(device)
    n = n or product_size(dtype, device, max_n=8192 if device.type == "cuda" else 2048)
    fn = _matmul_fn(dtype, n, device)
    secs = _best_seconds(fn, device, repeats)
    return {
        "flops_per_s": 2 * n**3 / min(secs),
        "method": f"{n}x{n} @ {n}x{n} {dtype} ({'torch._int_mm' if dtype == 'int8' else 'F.linear'}), "
                  f"best of {len(secs)} (after 1 warm-up)",
        "n": n,
        "samples_s": secs,
    }


def machine_identity(threads: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    return {
        "version": LIMITS_VERSION,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "affinity": affinity(),
        "threads": threads,
        "torch": torch.__version__,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
    }


def limits_path(identity: dict[str, Any]) -> Path:
    from slimbench.zoo.models import cache_dir

    return cache_dir() / "machine" / f"limits-{stable_hash(identity, length=20)}.json"


def measure_limits(threads: int, device: torch.device | str = "cpu", *, stream_bytes: int | None = None,
                   matmul_n: int | None = None, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8"),
                   load_threshold: float = DEFAULT_LOAD_THRESHOLD) -> dict[str, Any]:
    """Measure bandwidth and per-dtype FLOP/s now, with ``threads`` torch threads."""
    device = torch.device(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        with Contention() as c:
            bandwidth = measure_bandwidth(device, stream_bytes)
            flops: dict[str, Any] = {}
            for dt in dtypes:
                try:
                    flops[dt] = measure_flops(dt, device, matmul_n)
                except (RuntimeError, NotImplementedError) as err:  # e.g. _int_mm missing on a build
                    flops[dt] = {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        torch.set_num_threads(before)
    noisy = c.other_cores > load_threshold
    return {
        "identity": machine_identity(threads, device),
        "bandwidth": bandwidth,
        "flops": flops,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "measure_seconds": time.perf_counter() - t0,
        "other_cores_during_measurement": round(c.other_cores, 3),
        "noisy": noisy,
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def machine_limits(threads: int | None = None, device: torch.device | str = "cpu", *, refresh: bool = False,
                   **measure_kw: Any) -> dict[str, Any]:
    """The cached limits for this machine and thread count, measured (and cached) if missing.

    The returned dict says where it came from: ``source`` is ``cache`` or ``measured`` and
    ``path`` the cache file. A noisy measurement is returned but not cached.
    """
    threads = threads or torch.get_num_threads()
    identity = machine_identity(threads, device)
    path = limits_path(identity)
    cached = None if refresh else read_limits(path, identity)
    if cached is not None and (not cached["noisy"] or machine_busy()):
        # A noisy entry is measured again only when the machine is quiet now: measuring under
        # the same load would only pay the cost again.
        return {**cached, "source": "cache", "path": str(path)}
    data = measure_limits(threads, device, **measure_kw)
    if cached is None or not data["noisy"]:
        write_json_atomic(path, data)
    return {**data, "source": "measured", "path": str(path)}


def read_limits(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or corrupt: measured again
        return None
    return data if data.get("identity") == identity else None


def machine_busy(seconds: float = 0.2, threshold: float = DEFAULT_LOAD_THRESHOLD) -> bool:
    """Whether other processes take more than ``threshold`` cores of ours right now."""
    with Contention() as c:
        time.sleep(seconds)
    return c.other_cores > threshold


def limits_summary(limits: dict[str, Any]) -> dict[str, Any]:
    """The part of the limits a record keeps: values, how they were measured, where they came from."""
    flops = {k: {"flops_per_s": v["flops_per_s"], "method": v["method"]} if "flops_per_s" in v else v
             for k, v in limits.get("flops", {}).items()}
    return {
        "bandwidth_bytes_per_s": limits["bandwidth"]["bytes_per_s"],
        "bandwidth_method": limits["bandwidth"]["method"],
        "flops": flops,
        "threads": limits["identity"]["threads"],
        "device": limits["identity"]["device"],
        "measured_at": limits.get("measured_at"),
        "source": limits.get("source"),
        "path": limits.get("path"),
        "noisy": limits.get("noisy"),
        "other_cores_during_measurement": limits.get("other_cores_during_measurement"),
    }
