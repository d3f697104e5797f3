"""The machine's own limits, the denominators of every roofline fraction.

- ``bandwidth``: the bytes/s a memory-bound decode can hope for, measured **at the working set
  that matters**: the bytes one decode step reads (weights + KV cache), not a multiple of a
  reported cache size (a VM may misstate it). Beyond ``BANDWIDTH_CAP_BYTES`` the machine's
  DRAM speed no longer depends on the size, so larger working sets are measured at the cap.
  Two kernels read the same bytes: ``torch.sum`` over a float32 tensor and a matrix-vector
  product (``F.linear`` of one row, what a decode step does); rounds alternate the kernels,
  each sample long enough for the clock (a small set is read several times per sample), and
  the limit is the best kernel's best sample.
- ``flops``: attainable matrix-product FLOP/s per dtype (float32, bfloat16, float16 through
  ``F.linear``, int8 through ``torch._int_mm``), best of repeats of an ``n x n x n`` product, n
  the smallest of 256, 512, ... whose product takes 20 ms.

Every limit carries its own agreement check: the best of the odd rounds and the best of the
even rounds are two measurements of it; they must agree within ``AGREEMENT`` (10%), else the
limit is ``unstable``. A limit measured while other processes used the cores (``noisy``) or
unstable is used for the cell at hand, flagged, and **never cached**: only a quiet, stable
measurement is kept (as JSON under ``models.cache_dir()/machine``, keyed by CPU model, core
count, affinity, threads, torch version, device and working-set size).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from slimbench.config import stable_hash
from slimbench.measure.clocks import cpu_name
from slimbench.measure.machine import DEFAULT_LOAD_THRESHOLD, Contention, affinity

LIMITS_VERSION = 3  # bump when the measurement changes: old cache files are then ignored
BANDWIDTH_CAP_BYTES = 2**30
MIN_WORKING_SET = 64 * 2**10
DEFAULT_WORKING_SET = 256 * 2**20  # when no model says what it reads (accel-bench's header line)
AGREEMENT = 0.10
MIN_SAMPLE_S = 0.002  # a timed sample shorter than this is mostly clock and call overhead
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], Any], device: torch.device, inner: int) -> float:
    """Seconds per call, over ``inner`` back-to-back calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def _inner_calls(fn: Callable[[], Any], device: torch.device) -> int:
    """Calls per sample so that a sample lasts at least ``MIN_SAMPLE_S``."""
    fn()  # warm-up: page faults, kernel selection
    one = _time_call(fn, device, 1)
    return max(1, math.ceil(MIN_SAMPLE_S / max(one, 1e-9)))


def agreement(samples_per_round: list[float]) -> dict[str, Any]:
    """Two measurements of one limit: the best of the odd and of the even rounds, and whether they agree."""
    odd, even = samples_per_round[0::2], samples_per_round[1::2]
    if not odd or not even:
        return {"halves_s": None, "difference": None, "within": AGREEMENT, "ok": False}
    a, b = min(odd), min(even)
    diff = abs(a - b) / max(a, b)
    return {"halves_s": [a, b], "difference": round(diff, 4), "within": AGREEMENT, "ok": diff <= AGREEMENT}


def working_set_size(working_set: int | None, device: torch.device) -> int:
    """The bytes the bandwidth is measured over: the working set, within [64 KiB, 1 GiB] and a quarter
    of the memory available now."""
    size = DEFAULT_WORKING_SET if not working_set else int(working_set)
    cap = BANDWIDTH_CAP_BYTES
    if device.type == "cpu":
        cap = min(cap, psutil.virtual_memory().available // 4)
    return max(MIN_WORKING_SET, min(size, cap)) // 4096 * 4096


def _bandwidth_kernels(size: int, device: torch.device) -> dict[str, Callable[[], Any]]:
    cols = 1024 if size >= 1024 * 4 * 16 else 64
    rows = max(1, size // (4 * cols))
    w = torch.ones(rows, cols, dtype=torch.float32, device=device)
    v = torch.ones(1, cols, dtype=torch.float32, device=device)
    flat = w.view(-1)
    return {
        "sum": lambda: flat.sum(),
        "matvec": lambda: torch.nn.functional.linear(v, w),
    }


def measure_bandwidth(device: torch.device | str = "cpu", working_set: int | None = None,
                      rounds: int = 8) -> dict[str, Any]:
    """Read bandwidth at ``working_set`` bytes, two kernels alternated over ``rounds``; best of each."""
    device = torch.device(device)
    size = working_set_size(working_set, device)
    kernels = _bandwidth_kernels(size, device)
    inner = {name: _inner_calls(fn, device) for name, fn in kernels.items()}
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    names = list(kernels)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(_time_call(kernels[name], device, inner[name]))
    best = min(names, key=lambda n: min(samples[n]))
    per_kernel = {n: {"bytes_per_s": size / min(s), "samples_s": s, "calls_per_sample": inner[n]}
                  for n, s in samples.items()}
    return {
        "bytes_per_s": size / min(samples[best]),
        "kernel": best,
        "kernels": per_kernel,
        "method": f"best of torch.sum and a matrix-vector product over {size / 2**20:.1f} MiB float32, "
                  f"{rounds} alternating rounds each (best: {best})",
        "size_bytes": size,
        "working_set_bytes": int(working_set) if working_set else None,
        "agreement": agreement(samples[best]),
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


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float = 3.0) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up; fewer (at least 4) if they exceed ``budget_s``."""
    fn()
    out: list[float] = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if len(out) >= 4 and time.perf_counter() - t_start > budget_s:
            break  # a slow dtype (fp16 matmul on CPUs without fp16 arithmetic) must not take minutes
        out.append(_time_call(fn, device, 1))
    return out


def product_size(dtype: str, device: torch.device, max_n: int, min_seconds: float = 0.02) -> int:
    """The smallest n (256, 512, ... up to ``max_n``) whose product takes ``min_seconds``."""
    n = 256
    while n < max_n:
        fn = _matmul_fn(dtype, n, device)
        if min(_seconds(fn, device, repeats=4, budget_s=min_seconds)) >= min_seconds:
            break  # (the best of a few calls: one descheduled call must not stop the growth)
        n *= 2
    return n


def measure_flops(dtype: str, device: torch.device | str = "cpu", n: int | None = None,
                  repeats: int = 8) -> dict[str, Any]:
    """Attainable FLOP/s for ``dtype``: ``2 n^3`` over the best time of an n x n x n product."""
    device = torch.device(device)
    n = n or product_size(dtype, device, max_n=8192 if device.type == "cuda" else 2048)
    secs = _seconds(_matmul_fn(dtype, n, device), device, repeats)
    return {
        "flops_per_s": 2 * n**3 / min(secs),
        "method": f"{n}x{n} @ {n}x{n} {dtype} ({'torch._int_mm' if dtype == 'int8' else 'F.linear'}), "
                  f"best of {len(secs)} (after 1 warm-up)",
        "n": n,
        "samples_s": secs,
        "agreement": agreement(secs),
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


def limits_path(identity: dict[str, Any], size: int) -> Path:
    from slimbench.zoo.models import cache_dir

    return cache_dir() / "machine" / f"limits-{stable_hash({**identity, 'working_set': size}, length=20)}.json"


def machine_busy(seconds: float = 0.2, threshold: float = DEFAULT_LOAD_THRESHOLD) -> bool:
    """Whether other processes take more than ``threshold`` cores of ours right now."""
    with Contention() as c:
        time.sleep(seconds)
    return c.other_cores > threshold


def measure_limits(threads: int, device: torch.device | str = "cpu", *, working_set: int | None = None,
                   matmul_n: int | None = None, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8"),
                   load_threshold: float = DEFAULT_LOAD_THRESHOLD) -> dict[str, Any]:
    """Measure bandwidth (at ``working_set`` bytes) and per-dtype FLOP/s now, with ``threads`` torch threads."""
    device = torch.device(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    busy_before = machine_busy(threshold=load_threshold)
    try:
        with Contention() as c:
            bandwidth = measure_bandwidth(device, working_set)
            flops: dict[str, Any] = {}
            for dt in dtypes:
                try:
                    flops[dt] = measure_flops(dt, device, matmul_n)
                except (RuntimeError, NotImplementedError) as err:  # e.g. _int_mm missing on a build
                    flops[dt] = {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        torch.set_num_threads(before)
    unstable = [k for k, v in [("bandwidth", bandwidth), *flops.items()]
                if isinstance(v.get("agreement"), dict) and not v["agreement"]["ok"]]
    return {
        "identity": machine_identity(threads, device),
        "bandwidth": bandwidth,
        "flops": flops,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "measure_seconds": time.perf_counter() - t0,
        "other_cores_during_measurement": round(c.other_cores, 3),
        "busy_before": busy_before,
        "noisy": busy_before or c.other_cores > load_threshold,
        "unstable": unstable,
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def read_limits(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or corrupt: measured again
        return None
    ok = data.get("identity") == identity and not data.get("noisy") and not data.get("unstable")
    return data if ok else None


def machine_limits(threads: int | None = None, device: torch.device | str = "cpu", *, working_set: int | None = None,
                   refresh: bool = False, **measure_kw: Any) -> dict[str, Any]:
    """The limits for this machine, thread count and working set: cached if a quiet, stable measurement
    was kept, else measured now (and kept only if quiet and stable).

    The returned dict says where it came from: ``source`` is ``cache`` or ``measured``, ``path`` the
    cache file, ``cached`` whether it is (now) in the cache.
    """
    threads = threads or torch.get_num_threads()
    identity = machine_identity(threads, device)
    size = working_set_size(working_set, torch.device(device))
    path = limits_path(identity, size)
    cached = None if refresh else read_limits(path, identity)
    if cached is not None:
        return {**cached, "source": "cache", "path": str(path), "cached": True}
    data = measure_limits(threads, device, working_set=working_set, **measure_kw)
    keep = not data["noisy"] and not data["unstable"]
    if keep:
        write_json_atomic(path, data)
    return {**data, "source": "measured", "path": str(path), "cached": keep}


def problems(limits: dict[str, Any]) -> list[str]:
    """Why ``limits`` should not be trusted as denominators (empty: measured quietly and stable)."""
    out = []
    if limits.get("noisy"):
        out.append(f"the machine limits were measured while other processes used the cores "
                   f"({limits.get('other_cores_during_measurement', '?')} cores)")
    for name in limits.get("unstable") or []:
        part = limits["bandwidth"] if name == "bandwidth" else limits["flops"].get(name, {})
        diff = (part.get("agreement") or {}).get("difference")
        out.append(f"the {name} limit's two measurements differ by {diff:.0%} (more than {AGREEMENT:.0%})"
                   if isinstance(diff, float) else f"the {name} limit could not be checked against itself")
    return out


def limits_summary(limits: dict[str, Any]) -> dict[str, Any]:
    """The part of the limits a record keeps: values, how they were measured, where they came from."""
    flops = {k: {"flops_per_s": v["flops_per_s"], "method": v["method"], "agreement": v.get("agreement")}
             if "flops_per_s" in v else v for k, v in limits.get("flops", {}).items()}
    bw = limits["bandwidth"]
    return {
        "bandwidth_bytes_per_s": bw["bytes_per_s"],
        "bandwidth_method": bw["method"],
        "bandwidth_size_bytes": bw.get("size_bytes"),
        "bandwidth_kernels": {k: v["bytes_per_s"] for k, v in (bw.get("kernels") or {}).items()},
        "bandwidth_agreement": bw.get("agreement"),
        "flops": flops,
        "threads": limits["identity"]["threads"],
        "device": limits["identity"]["device"],
        "measured_at": limits.get("measured_at"),
        "source": limits.get("source"),
        "cached": limits.get("cached"),
        "path": limits.get("path"),
        "noisy": limits.get("noisy"),
        "unstable": limits.get("unstable"),
        "other_cores_during_measurement": limits.get("other_cores_during_measurement"),
    }
