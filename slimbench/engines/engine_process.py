"""An inference engine in a process of its own: request/reply over a socket pair, no torch inside.

The engine process is a fresh ``python -c`` (not a fork: no inherited threads, locks or torch
state) that imports only what its ``serve`` target imports, so its memory is the engine's
own: the peak resident set it reports (``VmHWM``) is what the engine needed, not torch's.

The owner sends pickled requests and waits for each reply in short slices, checking that the
process is alive, so an engine that raises (its traceback comes back), dies (a crash in native
code, killed for memory) or hangs past ``timeout_s`` becomes an ``EngineError`` naming what it
was doing; the process is then killed. ``close()`` (also a finalizer, and at interpreter exit)
asks it to stop, then kills and reaps it: no engine process outlives its owner. The engine
side exits on its own when the socket closes or its parent disappears.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

POLL_S = 0.05


class EngineError(RuntimeError):
    """The engine process raised, died or did not answer in time."""


def _shutdown(proc: subprocess.Popen, conn: Connection, grace_s: float = 3.0) -> None:
    with contextlib.suppress(OSError, ValueError, BrokenPipeError):
        conn.send(("stop", None))
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
    with contextlib.suppress(OSError):
        conn.close()


@functools.cache
def code_only_path() -> str:
    """A folder holding only a link to the slimbench package (its parent may be a site-packages)."""
    folder = Path(tempfile.mkdtemp(prefix="slimbench-code-"))
    (folder / "slimbench").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    atexit.register(shutil.rmtree, folder, True)
    return str(folder)


class EngineProcess:
    """Start ``target`` ("module:function", called as ``function(payload)`` -> state with
    ``handle(request)``, optional ``info()`` and ``close()``) in a new Python process."""

    def __init__(self, target: str, payload: Any, *, name: str, timeout_s: float, start_timeout_s: float = 600.0,
                 env: dict[str, str] | None = None, python: str | None = None):
        self.name, self.timeout_s = name, timeout_s
        parent, child = socket.socketpair()
        code = "import sys; from slimbench.engines.engine_process import serve; serve(int(sys.argv[1]), sys.argv[2])"
        # another environment's interpreter (vLLM's) sees SlimBench's code only, none of its packages
        path = sys.path if python is None else [code_only_path()]
        full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        self.proc = subprocess.Popen(
            [python or sys.executable, "-c", code, str(child.fileno()), target],
            pass_fds=(child.fileno(),), env=full_env, stdin=subprocess.DEVNULL,
        )
        child.close()
        # the engine does the cell's measured work: its CPU is the measurement's own, not contention
        # (imported here: the engine side of this module runs in interpreters without torch)
        from slimbench.measure import machine

        machine.add_measured_pids([self.proc.pid])
        self.conn = Connection(os.dup(parent.fileno()))
        parent.close()
        self.closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self.proc, self.conn)
        atexit.register(self._finalizer)
        self.conn.send(("setup", payload))
        self.info = self._reply("start-up", start_timeout_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _fail(self, message: str) -> EngineError:
        self.close()
        return EngineError(f"{self.name}: {message}")

    def _reply(self, what: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.conn.poll(POLL_S):
                try:
                    status, value = self.conn.recv()
                except (EOFError, OSError):
                    self.proc.wait(2.0)
                    raise self._fail(self._death(what)) from None
                if status == "error":
                    raise self._fail(f"failed during {what}: {value}")
                return value
            if self.proc.poll() is not None:
                raise self._fail(self._death(what))
            if time.monotonic() > deadline:
                raise self._fail(f"no answer within {timeout_s:g} s during {what} (killed)")

    def _death(self, what: str) -> str:
        code = self.proc.returncode
        sig = f" (signal {-code})" if code is not None and code < 0 else ""
        return f"the engine process (pid {self.proc.pid}) died during {what} with exit code {code}{sig}"

    def request(self, message: dict[str, Any], *, what: str | None = None, timeout_s: float | None = None) -> Any:
        if self.closed:
            raise EngineError(f"{self.name}: the engine process was shut down")
        try:
            self.conn.send(("request", message))
        except (OSError, ValueError) as exc:
            raise self._fail(f"cannot send to the engine process: {exc}") from None
        return self._reply(what or message.get("op", "a request"), timeout_s or self.timeout_s)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._finalizer()
            atexit.unregister(self._finalizer)
            from slimbench.measure import machine

            machine.remove_measured_pids([self.proc.pid])


# -- the engine side ----------------------------------------------------------------------------
def _load(target: str) -> Callable[[Any], Any]:
    import importlib

    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def serve(fd: int, target: str) -> None:
    """The engine process' loop: build the state from the first message, answer until "stop"."""
    conn = Connection(fd)
    parent = os.getppid()
    try:
        kind, payload = conn.recv()
        state = _load(target)(payload)
        conn.send(("ok", getattr(state, "info", dict)()))
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            try:
                kind, request = conn.recv()
            except (EOFError, OSError):
                return
            if kind == "stop":
                getattr(state, "close", lambda: None)()
                return
            conn.send(("ok", state.handle(request)))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError, pickle.PicklingError):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))
        os._exit(1)


def reset_peak_rss(pid: int) -> bool:
    """Reset a process' peak resident set (VmHWM) to its current one (Linux: ``clear_refs`` 5);
    False where the kernel or the permissions do not allow it (the peak then covers its lifetime)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int | None = None) -> dict[str, int]:
    """Peak and current resident set of a process (Linux /proc), in bytes."""
    out = {}
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["peak_rss_bytes" if key == "VmHWM" else "rss_bytes"] = int(value.split()[0]) * 1024
    return out


class EchoEngine:
    """A trivial engine for tests of the process mechanics: echo, sleep, burn (CPU), touch (memory
    held for the call only), raise, die."""

    def __init__(self, payload: Any):
        self.payload = payload

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "payload": self.payload}

    def handle(self, req: dict[str, Any]) -> Any:
        if req["op"] == "sleep":
            time.sleep(req["seconds"])
        elif req["op"] == "burn":
            end = time.process_time() + req["seconds"]
            while time.process_time() < end:
                pass
        elif req["op"] == "touch":
            block = bytearray(req["bytes"])  # zero-filled: every page written, so resident
            del block
        elif req["op"] == "raise":
            raise RuntimeError("requested failure")
        elif req["op"] == "die":
            os._exit(3)
        return req.get("value")
