"""Claims: which `run` process is computing which cell of a results folder.

Two drivers on one folder must never compute a cell twice. Before a driver hands a cell to
a worker it claims it with an exclusive create of ``<root>/claims/<run_id>.<gen>.claim``
(JSON: host, pid, the pid's start time, a token for this driver, when); the file's mtime is
the heartbeat, refreshed by a thread while the driver lives. A claim is stale when its owner
is gone: on the same host at once (the pid is not running, or is another process now), on
another host when its heartbeat is older than ``timeout`` seconds.

A stale claim of generation ``g`` is taken over by creating generation ``g + 1``, again an
exclusive create: of several drivers that saw the same stale claim exactly one wins, without
a rename that could steal a claim made in between. A driver releases a claim after the
cell's record is written, so "no claim" plus "no ok record" means nobody has it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from slimbench.sweep.store import ResultStore, utc_now

HEARTBEAT_S = 5.0
TIMEOUT_S = 60.0


def process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass(frozen=True)
class Owner:
    """Who holds a claim, as read from its file."""

    host: str
    pid: int
    started: float | None
    token: str
    since: str
    heartbeat_age: float
    label: str = ""

    def describe(self) -> str:
        return f"{self.host}:{self.pid} since {self.since[:19].replace('T', ' ')} UTC"


class ClaimBook:
    """The claims of one results folder, and the ones this process holds."""

    def __init__(self, store: ResultStore, *, timeout: float = TIMEOUT_S, heartbeat: float = HEARTBEAT_S):
        self.store = store
        self.dir = store.root / "claims"
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        self.held: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------
    def _files(self, run_id: str) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob(f"{run_id}.*.claim"):
            gen = p.name[len(run_id) + 1 : -len(".claim")]
            if gen.isdigit():
                out.append((int(gen), p))
        return sorted(out)

    def owner_of(self, path: Path) -> Owner | None:
        """The owner recorded in a claim file (None if the file is gone)."""
        try:
            mtime = path.stat().st_mtime
            data: dict[str, Any] = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            data = {}  # being written right now, or damaged: judged by its heartbeat alone
            mtime = path.stat().st_mtime if path.exists() else 0.0
        return Owner(
            host=str(data.get("host", "?")),
            pid=int(data.get("pid", -1)),
            started=data.get("pid_started"),
            token=str(data.get("token", "")),
            since=str(data.get("since", "")),
            heartbeat_age=max(0.0, time.time() - mtime),
            label=str(data.get("label", "")),
        )

    def is_live(self, owner: Owner) -> bool:
        if owner.host == self.host and owner.pid > 0:
            started = process_start(owner.pid)
            if started is None:
                return False  # the owner died (SIGKILL, reboot): take over at once
            if owner.started is not None and abs(started - owner.started) > 1.0:
                return False  # the pid now belongs to another process
        return owner.heartbeat_age < self.timeout

    def current(self, run_id: str) -> Owner | None:
        """The live owner of a cell, or None if nobody (alive) holds it."""
        files = self._files(run_id)
        if not files:
            return None
        owner = self.owner_of(files[-1][1])
        return owner if owner is not None and self.is_live(owner) else None

    def stale(self, run_id: str) -> Owner | None:
        """The owner of a claim left behind by a dead driver, if any."""
        files = self._files(run_id)
        owner = self.owner_of(files[-1][1]) if files else None
        return owner if owner is not None and not self.is_live(owner) else None

    # -- claiming ----------------------------------------------------------------------------
    def try_claim(self, run_id: str, label: str = "") -> tuple[str, Owner | None]:
        """Claim one cell: ("claimed", None), ("done", None) or ("owned", live owner)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # a lost race re-reads the folder; a handful of rounds always settles
            if self.store.has_ok(run_id):
                return "done", None
            files = self._files(run_id)
            gen = 0
            if files:
                owner = self.owner_of(files[-1][1])
                if owner is not None and self.is_live(owner):
                    return "owned", owner
                gen = files[-1][0] + 1 if owner is not None else files[-1][0]
            path = self.dir / f"{run_id}.{gen}.claim"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(
                    {
                        "host": self.host,
                        "pid": self.pid,
                        "pid_started": process_start(self.pid),
                        "token": self.token,
                        "since": utc_now(),
                        "label": label,
                    },
                    f,
                )
            with self._lock:
                self.held[run_id] = path
            # The previous owner may have written its record and released just before we
            # looked at the claims: the record decides.
            if self.store.has_ok(run_id):
                self.release(run_id)
                return "done", None
            return "claimed", None
        raise RuntimeError(f"could not settle the claim of cell {run_id} in {self.dir}")

    def release(self, run_id: str) -> None:
        with self._lock:
            path = self.held.pop(run_id, None)
        if path is None:
            return
        mine = int(path.name[len(run_id) + 1 : -len(".claim")])
        for gen, p in self._files(run_id):
            if gen <= mine:  # ours, and the stale ones we took over
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def release_all(self) -> None:
        for run_id in list(self.held):
            self.release(run_id)

    # -- heartbeat ---------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                paths = list(self.held.values())
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(p)

    def __enter__(self) -> ClaimBook:
        self._thread = threading.Thread(target=self._beat, name="slimbench-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release_all()

    # -- for `status` ---------------------------------------------------------------------------
    def all_claims(self) -> dict[str, tuple[Owner, bool]]:
        """run id -> (owner of the newest claim, whether it is live)."""
        out: dict[str, tuple[Owner, bool]] = {}
        if not self.dir.is_dir():
            return out
        newest: dict[str, tuple[int, Path]] = {}
        for p in self.dir.glob("*.claim"):
            run_id, _, gen = p.name[: -len(".claim")].rpartition(".")
            if gen.isdigit() and (run_id not in newest or int(gen) > newest[run_id][0]):
                newest[run_id] = (int(gen), p)
        for run_id, (_, p) in newest.items():
            owner = self.owner_of(p)
            if owner is not None:
                out[run_id] = (owner, self.is_live(owner))
        return out
