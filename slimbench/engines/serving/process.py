"""Server processes: start on loopback at a free port, wait until ready, stop whatever happens.

A server runs in its own session (process group), its output in a log file, so that

- readiness is polled over HTTP while its process is watched: a server that exits or stops
  answering before it is ready becomes a ``ServerError`` carrying its last log lines;
- ``stop`` sends SIGTERM to the whole group, waits, then SIGKILLs what is left and reaps the
  leader: no worker of the server outlives the cell (also run at interpreter exit); and a cell
  killed outright takes the group with it (the server runs under ``guard.py``, which kills its
  group when the cell's process is gone);
- ``listening_beyond_loopback`` lists any socket the server's processes listen on outside
  127.0.0.1 / ::1 (the task refuses such a server: nothing may listen beyond loopback).

The in-process server (``hosted``) offers the same calls, so the task drives both alike.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

LOOPBACK = ("127.0.0.1", "::1")
LOG_TAIL_LINES = 40


def guarded(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run under slimbench/engines/serving/guard.py: its whole process group dies with the
    cell, even when the cell is killed outright (no ``finally`` runs there)."""
    import sys

    return [sys.executable, str(Path(__file__).with_name("guard.py")), *cmd]


class ServerError(RuntimeError):
    """A server failed to start, died or answered errors; the message ends with its last log lines."""


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET (``body`` None) or POST to a loopback URL."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw or b"null")
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def tree(pid: int) -> list[psutil.Process]:
    """The process and its live descendants (empty if it is gone)."""
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (reaped children included)."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + (t.children_user + t.children_system if p.pid == pid else 0.0)
    return total


def listening_beyond_loopback(pids: Sequence[int]) -> list[str]:
    """``ip:port`` of each listening TCP socket of these processes bound outside loopback."""
    bad = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip not in LOOPBACK:
                    bad.append(f"{c.laddr.ip}:{c.laddr.port}")
    return bad


def set_affinity(pids: Sequence[int], cpus: Sequence[int]) -> None:
    """Pin every thread of these processes to ``cpus`` (Linux sets affinity per thread)."""
    for pid in pids:
        with contextlib.suppress(OSError, psutil.Error):
            for t in psutil.Process(pid).threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(t.id, list(cpus))


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for s in list(_LIVE):
        s.stop()


class ServerProcess:
    """One OpenAI-compatible server as a child process; see the module docstring."""

    kind = "process"

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
                 model_name: str = "slimbench", ready_path: str = "/v1/models", cpus: Sequence[int] = ()) -> None:
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.env, self.model_name, self.ready_path, self.cpus = env, model_name, ready_path, tuple(cpus)
        self.proc: subprocess.Popen | None = None
        self.cpu_at_exit: float | None = None
        self.returncode: int | None = None
        self.settings: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> None:
        """Start and wait until ``ready_path`` answers 200; ``ServerError`` otherwise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(guarded(self.cmd), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        _LIVE.add(self)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, list(self.cpus))  # threads it starts inherit it
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise self.error(f"{self.name} server exited with code {self.proc.returncode} before it was ready")
            with contextlib.suppress(OSError, ValueError):
                status, _ = http_json(self.url + self.ready_path, timeout=2.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise self.error(f"{self.name} server was not ready after {timeout_s:.0f} s")
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return [p.pid for p in tree(self.proc.pid)] if self.proc else []

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        if self.alive():
            return tree_cpu_seconds(self.proc.pid)
        return self.cpu_at_exit or 0.0

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def error(self, message: str) -> ServerError:
        return ServerError(f"{message}; its last log lines:\n{self.log_tail()}")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left; reap the leader. Idempotent."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            self.cpu_at_exit = tree_cpu_seconds(proc.pid)
        members = tree(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(members, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything that left the tree but not the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        self.returncode = proc.returncode
