"""Measurement: clocks, peak memory, and the environment every record carries."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch


class PeakMemory:
    """Peak memory while the block runs.

    CPU: the process' resident set size, sampled every ``interval`` seconds by a thread
    (ru_maxrss would report the lifetime peak, which includes earlier cells).
    CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    Cells of a sweep share one process; without this, the RSS a later cell's peak-memory
    reading starts from still holds what earlier models and compressions freed but glibc kept.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


def freeze_imports() -> None:
    """Leave what is alive now out of every later garbage collection (``gc.freeze``).

    For a process the sweep started itself (a worker, the memory probe's fork server), once
    everything is imported and before any model is loaded: the modules, classes and registries
    frozen here live as long as the process. torch, transformers and the registry create about
    400 thousand objects at import, and :func:`release_memory`'s full collection walked them
    all, about 0.2 s of CPU three times per group; after this it walks what the cells created.
    Frozen objects are still freed when their last reference goes; only a reference cycle among
    them would stay, and import-time objects are not garbage before the process ends. The
    registries' discovery (which imports every method and task module) runs first, so those
    modules are frozen too.
    """
    import gc

    from slimbench.registry import REGISTRIES

    for registry in REGISTRIES:
        _ = registry.entries
    gc.collect()
    gc.freeze()


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread of raw samples (the samples themselves are kept beside it)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "iqr": q[2] - q[0],
        "n": len(s),
    }


def timed(fn: Any, sync: Any) -> float:
    """Seconds for one call, the device synchronised before each clock read."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def environment(threads: int | None = None) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "hostname": platform.node(),
    }
    env["git"] = git_state(Path(__file__).resolve().parent.parent)
    return env
