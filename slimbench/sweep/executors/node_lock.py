"""The machine lock: timed cells measure alone, and whoever waits for it can say on what.

A readers-writer lock shared by every SlimBench process of this machine (flock on
``~/.cache/slimbench/node.lock``, or ``$SLIMBENCH_NODE_LOCK``). Each stage of a cell (load +
compress, one task) holds it shared; a timed task holds it exclusively, so nothing else
computes on the machine while it measures. flock has no writer preference, so a turnstile
(taken exclusively by everyone on the way in) keeps a stream of short shared holders from
starving a waiting timed task. The kernel drops a dead process' locks: a killed worker never
blocks the machine.

Visible: every holder and every waiter writes one small JSON file into ``node.lock.d/``
(pid, host, suite, cell, shared or exclusive, since when), removed when it lets go, so a
waiting run says "waiting for the machine lock held by PID 1234 (suite, cell) since 10:02:11"
and ``status`` shows such cells as waiting, not running. A process that holds the lock without
such a file (an older SlimBench) is found through /proc/locks, by pid alone.

Bounded: acquisition polls (non-blocking flock) and gives up after ``timeout`` seconds with
:class:`LockTimeout`, naming the holder; the runner turns that into failed records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

POLL_S = 0.2  # how often a waiter tries again
REPORT_S = 1.0  # how often a waiter says it is still waiting


class LockTimeout(Exception):
    """The machine lock was not free within the allowed time."""


def node_lock_path() -> Path:
    env = os.environ.get("SLIMBENCH_NODE_LOCK")
    return Path(env) if env else Path.home() / ".cache" / "slimbench" / "node.lock"


def registry_dir(path: Path) -> Path:
    return path.with_name(path.name + ".d")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%H:%M:%S")


@dataclass(frozen=True)
class Party:
    """A holder of, or waiter for, the machine lock, as its registry file says."""

    pid: int
    host: str
    state: str  # holding | waiting
    mode: str  # shared | exclusive
    since: float  # epoch seconds
    suite: str = ""
    cell: str = ""
    run_ids: tuple[str, ...] = ()
    results: str = ""
    recorded: bool = True  # False: found in /proc/locks, nothing else known

    def describe(self) -> str:
        if not self.recorded:
            return f"PID {self.pid} (a process without a lock record: an older SlimBench, or another tool)"
        what = ", ".join(x for x in (self.suite, self.cell) if x) or "no cell recorded"
        return f"PID {self.pid} ({what}; {self.mode}) since {_clock(self.since)}"


def _alive(pid: int, started: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) <= 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def read_parties(path: Path | None = None) -> list[Party]:
    """Every live holder and waiter of this machine's lock (dead processes' files are ignored)."""
    folder = registry_dir(path or node_lock_path())
    host = socket.gethostname()
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(f.read_text())
            if d.get("host") != host or not _alive(int(d["pid"]), d.get("pid_started")):
                continue
            out.append(Party(pid=int(d["pid"]), host=d["host"], state=str(d["state"]), mode=str(d["mode"]),
                             since=float(d["since"]), suite=str(d.get("suite") or ""), cell=str(d.get("cell") or ""),
                             run_ids=tuple(d.get("run_ids") or ()), results=str(d.get("results") or "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or damaged: skipped
    return out


def prune(path: Path) -> None:
    """Remove the registry files of this host's processes that are gone (killed before they could)."""
    host = socket.gethostname()
    for f in registry_dir(path).glob(f"{host}-*.json"):
        try:
            d = json.loads(f.read_text())
            dead = not _alive(int(d["pid"]), d.get("pid_started"))
        except (OSError, ValueError, KeyError, TypeError):
            dead = time.time() - f.stat().st_mtime > 60 if f.exists() else False  # damaged and old
        if dead:
            with contextlib.suppress(OSError):
                f.unlink()


def proc_lock_pids(path: Path) -> list[int]:
    """Pids that hold a flock on ``path``, from /proc/locks (Linux; empty elsewhere)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (blocked waiters carry "->")
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError, IndexError):
            if int(parts[5].split(":")[-1]) == inode:
                pids.append(int(parts[4]))
    return pids


class NodeLock:
    """The machine lock of this process (one per process: two would block each other)."""

    def __init__(self, path: Path | None = None):
        self.path = path or node_lock_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._main = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self._gate = os.open(self.path.with_suffix(".turnstile"), os.O_RDWR | os.O_CREAT, 0o666)
        self.registry = registry_dir(self.path)
        self.registry.mkdir(exist_ok=True)
        self._entry = self.registry / f"{socket.gethostname()}-{os.getpid()}.json"
        self.held: str | None = None  # mode held now
        prune(self.path)

    # -- the registry --------------------------------------------------------------------------
    def _note(self, state: str, mode: str, who: dict[str, Any], since: float) -> None:
        data = {"pid": os.getpid(), "pid_started": psutil.Process().create_time(), "host": socket.gethostname(),
                "state": state, "mode": mode, "since": since, **who}
        tmp = self._entry.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # a read-only home: the lock still works, only unseen
            tmp.write_text(json.dumps(data, default=str))
            os.replace(tmp, self._entry)

    def _forget(self) -> None:
        with contextlib.suppress(OSError):
            self._entry.unlink()

    def blockers(self, exclusive: bool) -> list[Party]:
        """Who this process is waiting for: holders first (an exclusive one above all), then waiters."""
        me = os.getpid()
        parties = [p for p in read_parties(self.path) if p.pid != me]
        holders = [p for p in parties if p.state == "holding"]
        holders.sort(key=lambda p: (p.mode != "exclusive", p.since))
        if not holders:
            known = {p.pid for p in parties}
            holders = [Party(pid, socket.gethostname(), "holding", "?", 0.0, recorded=False)
                       for pid in proc_lock_pids(self.path) if pid != me and pid not in known]
        waiting = sorted((p for p in parties if p.state == "waiting"), key=lambda p: p.since)
        return holders + waiting

    # -- acquiring -----------------------------------------------------------------------------
    def _try(self, fd: int, mode: int) -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def wait(self, exclusive: bool = False, who: dict[str, Any] | None = None,
             timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Acquire the lock; while it is busy, yield what this process waits for about once a second.

        Raises :class:`LockTimeout` after ``timeout`` seconds (None: wait as long as it takes).
        """
        mode = "exclusive" if exclusive else "shared"
        who = who or {}
        t0 = time.time()
        gate = False
        last_report = -REPORT_S
        noted = False
        try:
            while True:
                if not gate:
                    gate = self._try(self._gate, fcntl.LOCK_EX)
                if gate and self._try(self._main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
                    break
                waited = time.time() - t0
                if not noted:  # others (status, their bars) see who waits, for which cells
                    self._note("waiting", mode, who, t0)
                    noted = True
                if timeout is not None and waited >= timeout:
                    raise LockTimeout(self.timeout_message(exclusive, timeout))
                if waited - last_report >= REPORT_S:
                    last_report = waited
                    yield {"since": t0, "waited": waited, "mode": mode, "text": self.waiting_text(exclusive, t0)}
                time.sleep(POLL_S)
        except BaseException:
            self._forget()
            raise
        finally:
            if gate:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
        self.held = mode
        self._note("holding", mode, who, time.time())

    def waiting_text(self, exclusive: bool, since: float) -> str:
        blockers = self.blockers(exclusive)
        if not blockers:
            return f"waiting for the machine lock since {_clock(since)}"
        first = blockers[0]
        held = "held by" if first.state == "holding" else "queued behind"
        more = f" and {len(blockers) - 1} other(s)" if len(blockers) > 1 else ""
        return f"waiting for the machine lock {held} {first.describe()}{more}"

    def timeout_message(self, exclusive: bool, timeout: float) -> str:
        blockers = self.blockers(exclusive)
        who = blockers[0].describe() if blockers else "another process"
        if timeout == 0:  # an earlier stage of this run waited the whole --lock-timeout: not waited for again
            return (f"the machine lock was still held by {who} (an earlier cell of this run already waited its "
                    "--lock-timeout). Run again when it is free, raise --lock-timeout, or run only the untimed "
                    "cells with --quality-only")
        return (f"the machine lock was not free within --lock-timeout {timeout:g} s: held by {who}. "
                "Run again when it is free, raise --lock-timeout, or run only the untimed cells with --quality-only")

    def acquire(self, exclusive: bool = False, who: dict[str, Any] | None = None,
                timeout: float | None = None) -> None:
        for _ in self.wait(exclusive, who, timeout):
            pass

    def release(self) -> None:
        if self.held is None:
            return
        self._forget()
        fcntl.flock(self._main, fcntl.LOCK_UN)
        self.held = None

    @contextlib.contextmanager
    def hold(self, exclusive: bool = False, who: dict[str, Any] | None = None,
             timeout: float | None = None) -> Iterator[None]:
        self.acquire(exclusive, who, timeout)
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        self.release()
        for fd in (self._main, self._gate):
            with contextlib.suppress(OSError):
                os.close(fd)


class NoLock:
    """What ``--quality-only`` runs under: no machine lock at all (quality does not depend on load)."""

    held: str | None = None

    def wait(self, exclusive: bool = False, who: dict[str, Any] | None = None,
             timeout: float | None = None) -> Iterator[dict[str, Any]]:
        yield from ()

    def acquire(self, *a: Any, **k: Any) -> None:
        pass

    def release(self) -> None:
        pass

    @contextlib.contextmanager
    def hold(self, *a: Any, **k: Any) -> Iterator[None]:
        yield


_NODE_LOCK: NodeLock | None = None


def node_lock() -> NodeLock:
    """One lock object per process (two in one process would block each other)."""
    global _NODE_LOCK
    if _NODE_LOCK is None or _NODE_LOCK.path != node_lock_path():
        _NODE_LOCK = NodeLock()
    return _NODE_LOCK


def waiting_cells(path: Path | None = None) -> dict[str, tuple[Party, str]]:
    """run id -> (the waiter, what it waits for), for every cell some process waits the lock for."""
    out: dict[str, tuple[Party, str]] = {}
    path = path or node_lock_path()
    parties = read_parties(path)
    holders = sorted((p for p in parties if p.state == "holding"), key=lambda p: (p.mode != "exclusive", p.since))
    if not holders and any(p.state == "waiting" for p in parties):  # a holder without a record (older SlimBench)
        known = {p.pid for p in parties}
        holders = [Party(pid, socket.gethostname(), "holding", "?", 0.0, recorded=False)
                   for pid in proc_lock_pids(path) if pid not in known]
    for p in parties:
        if p.state != "waiting":
            continue
        others = [h for h in holders if h.pid != p.pid]
        if others:
            text = f"waiting for the machine lock held by {others[0].describe()}"
        else:
            text = "waiting for the machine lock"
        text += f"; waiting since {_clock(p.since)}"
        for run_id in p.run_ids:
            out[run_id] = (p, text)
    return out
