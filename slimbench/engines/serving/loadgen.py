"""GuideLLM, the load generator, in an environment of its own; one run of it as a child process.

GuideLLM 0.8.1 pins ``click~=8.4``, SlimBench's environment pins click 8.5.1, so GuideLLM cannot
be installed beside SlimBench. On first use SlimBench builds a virtual environment for it under
``<cache>/envs/guidellm-0.8.1``: the exact packages below (``pip install --no-deps``), and a
``.pth`` line that puts SlimBench's own site-packages *after* them (torch, transformers,
datasets, pandas, ... are shared, at the versions SlimBench pins, which satisfy GuideLLM's
requirements). Build it ahead with ``python -m slimbench.engines.serving.loadgen``.

A run is ``guidellm run -c scenario.json`` in its own process group, under ``guard.py`` (the
group dies with the cell): it is killed (the whole group) when it exceeds its time bound, and
its CPU time, children included, is read from ``wait4`` when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimbench.engines.own_env import move_into_place
from slimbench.zoo.models import cache_dir

GUIDELLM_VERSION = "0.8.1"
# What `pip install guidellm==0.8.1` adds to SlimBench's environment (resolved on this project's
# machine; everything else it needs is already there at SlimBench's pins).
PINS = (
    f"guidellm=={GUIDELLM_VERSION}", "click==8.4.2", "culsans==0.10.0", "aiologic==0.17.1", "ftfy==6.3.1",
    "wcwidth==0.9.5", "httpx==0.29.0", "httpcore==1.0.9", "h2==4.4.1", "hpack==4.2.0", "hyperframe==6.1.0",
    "sniffio==1.3.1", "pydantic-settings==2.16.3", "python-dotenv==1.2.4", "uvloop==0.23.0", "websockets==17.4",
    "eval_type_backport==0.4.0", "faker==40.63.0", "loguru==0.7.3", "sanic==25.12.1", "sanic-routing==23.12.0",
    "html5tagger==2.0.0", "tracerite==2.6.5", "aiofiles==25.1.0", "httptools==0.9.0", "ujson==6.1.0",
    "multidict==6.9.1", "wrapt==2.5.2", "setuptools==84.2.1",
)
ENV_NAME = f"guidellm-{GUIDELLM_VERSION}"
MARKER = "slimbench-env.json"


def env_dir() -> Path:
    return cache_dir() / "envs" / ENV_NAME


def executable() -> Path:
    return env_dir() / "bin" / "guidellm"


def _marker_ok(root: Path) -> bool:
    try:
        meta = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    base = [str(Path(b).resolve()) for b in meta.get("base") or []]
    return meta.get("pins") == list(PINS) and base == _base_site_packages()


def _base_site_packages() -> list[str]:
    # resolved: a worktree's .venv may be a link to a shared one, which then shares this environment
    return [str(Path(p).resolve()) for p in site.getsitepackages() if Path(p).is_dir()]


def unavailable() -> str | None:
    """None when the environment is built; else what building it needs."""
    if _marker_ok(env_dir()) and executable().exists():
        return None
    return (f"GuideLLM {GUIDELLM_VERSION} is built into its own environment on first use ({env_dir()}; needs PyPI "
            "once): python -m slimbench.engines.serving.loadgen")


def ensure_env(log: Callable[[str], None] = print) -> Path:
    """Build the environment if it is missing (under a lock; atomically); return guidellm's path."""
    root = env_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{ENV_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_ok(root) and executable().exists():
            return executable()
        log(f"building the GuideLLM {GUIDELLM_VERSION} environment in {root} (once)")
        tmp = root.with_name(root.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([python, "-m", "venv", str(tmp)], check=True)
        purelib = Path(subprocess.run([str(tmp / "bin" / "python"), "-c", "import sysconfig;"
                                       "print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                                      text=True).stdout.strip())
        (purelib / "_slimbench_base.pth").write_text("\n".join(_base_site_packages()) + "\n")
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", *PINS],
                       check=True)
        subprocess.run([str(tmp / "bin" / "guidellm"), "--version"], check=True, capture_output=True)
        (tmp / MARKER).write_text(json.dumps({"pins": list(PINS), "base": _base_site_packages()}))
        move_into_place(tmp, root)
        return executable()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUIDELLM__")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_UPDATE_DOWNLOAD_COUNTS="0",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", NO_COLOR="1")
    env.pop("PYTHONPATH", None)  # SlimBench's own path must not shadow the environment's packages
    return env


class GuideLLMRun:
    """``guidellm run -c SCENARIO`` as a child in its own process group, bounded in time."""

    def __init__(self, scenario: Path, log_path: Path, *, cpus: Sequence[int] = ()) -> None:
        self.scenario, self.log_path, self.cpus = scenario, log_path, tuple(cpus)
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.cpu_seconds: float | None = None  # user + system, its children included (from wait4)

    def start(self) -> None:
        from slimbench.engines.serving.process import guarded

        cmd = [str(executable()), "run", "-c", str(self.scenario), "--disable-console-interactive"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(guarded(cmd), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True,
                                         cwd=self.scenario.parent)
        if self.cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, list(self.cpus))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        """The exit code once it has ended (reaping it and reading its CPU time), else None."""
        if self.returncode is not None or self.proc is None:
            return self.returncode
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # Popen must not wait for it again
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        return self.returncode

    def wait(self, timeout_s: float, alive: Callable[[], bool] | None = None, slice_s: float = 0.2) -> str | None:
        """Wait for the end; None if it ended, else why it was stopped (time bound, server gone)."""
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                return f"the load generator exceeded its time bound of {timeout_s:.0f} s"
            if alive is not None and not alive():
                self.kill()
                return "the server died during the run"
            time.sleep(slice_s)
        return None

    def kill(self, grace_s: float = 3.0) -> None:
        if self.proc is None or self.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + grace_s
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.returncode is not None:
                break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its workers, if the leader went first

    def log_tail(self, lines: int = 30) -> str:
        from slimbench.engines.serving.process import tail

        return tail(self.log_path, lines)


def scenario(*, target: str, model: str, tokenizer: Path, data: Path, output: Path, profile: dict[str, Any],
             max_seconds: float, max_requests: int, warmup_requests: int, request_timeout_s: float, seed: int,
             extras: dict[str, Any] | None = None, health_route: str = "health") -> dict[str, Any]:
    """The GuideLLM scenario (its ``-c`` file) of one run: every load point of one profile.

    GuideLLM checks the server on ``/health`` before it starts; ``health_route`` names the path a
    server without one answers on (llama-cpp-python's server: ``v1/models``).
    """
    constraints: list[dict[str, Any]] = [{"kind": "max_duration", "seconds": max_seconds},
                                         {"kind": "max_requests", "count": max_requests}]
    backend: dict[str, Any] = {"kind": "openai_http", "target": target, "model": model,
                               "request_format": "/v1/completions", "timeout": request_timeout_s,
                               "timeout_connect": 10.0, "http2": False}
    if extras:
        backend["extras"] = {"body": extras}
    if health_route != "health":
        backend["api_routes"] = {"/health": health_route}
    warm = {"mode": "prefer_duration", "value": None, "percent": None}
    if warmup_requests:
        warm = {"mode": "requests", "value": warmup_requests, "percent": None}
    return {"spec": {
        "backend": backend,
        "profile": {**profile, "warmup": warm},
        "constraints": constraints,
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "json_file", "path": str(data)}],
        "seed": {"kind": "static", "value": seed},
        "outputs": [{"kind": "json", "path": str(output)}],
        "metrics": {"kind": "generative", "sample_size": None},
    }}


if __name__ == "__main__":
    print(ensure_env())
