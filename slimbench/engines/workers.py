"""A group of worker processes driven over pipes: start, request/reply, crash detection, shutdown.

The process that owns the model (the cell's process) is a coordinator, not a rank: it sends a
request to every worker and waits for every reply. Waiting polls the pipes in short slices and
checks, each slice, that every worker is alive, so a worker that raises (it sends its traceback
before exiting), dies (killed, out of memory) or hangs past ``timeout_s`` becomes a
``WorkerError`` naming the worker and its error, and the whole group is shut down: peers blocked
in a collective with the dead worker would otherwise wait forever.

Shutdown (``close``, also run by a finalizer when the group is garbage collected and at
interpreter exit) asks each worker to stop, waits a few seconds, then kills what is left and
reaps every process, so no orphan outlives the cell. Workers also exit on their own when their
pipe closes or their parent process disappears.

Workers are forked from multiprocessing's fork server, a clean process (no threads, no model)
that imported torch (and what the group's ``preload`` names) once: a spawned worker is a fresh
interpreter that imports torch and transformers again, about 6 s of CPU each on a 2-core machine,
for every worker of every group; a fork from the warm server takes milliseconds. Like a spawned
one, a worker inherits no threads or locks of the coordinator; the coordinator's environment at
start-up is sent with it and applied first (the server's is that of when it started).

Payloads cross the pipe pickled; tensors inside the one-off setup payload travel through
torch's shared-memory reductions (no copy per worker), per-request tensors are packed as
plain bytes (see ``pack``) because creating a shared-memory segment per decode step costs more
than copying a few hundred kilobytes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from slimbench.measure import machine

POLL_SLICE_S = 0.05


class WorkerError(RuntimeError):
    """A worker raised, died or timed out; the message carries its error."""


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous binds to loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """A tensor as (dtype, shape, bytes): plain pickling, any dtype (bf16 included)."""
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), raw.numpy().tobytes()


def unpack(packed: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    dtype, shape, raw = packed
    buf = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
    return buf.view(getattr(torch, dtype)).reshape(shape)


# -- the worker side ---------------------------------------------------------------------------
def _parent_gone(parent_pid: int) -> bool:
    """The coordinator no longer exists (a worker's parent is the fork server, not the coordinator)."""
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user took the pid: ours is gone
        return True
    return False


def worker_main(setup: Callable[[int, Any], Any], rank: int, conn, payload: Any, parent_pid: int,
                env: dict[str, str] | None = None) -> None:
    """Build this rank's state with ``setup(rank, payload)``, then serve requests until "stop".

    ``env``: the coordinator's environment at start-up (the fork server's may be older). The
    state's ``handle(request) -> reply`` answers each request; an exception is sent back as
    ("error", traceback) and ends the worker.
    """
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        state = setup(rank, payload)
        del payload
        conn.send(("ok", getattr(state, "info", lambda: None)()))
        while True:
            if not conn.poll(1.0):
                if _parent_gone(parent_pid):
                    return
                continue
            try:
                request = conn.recv()
            except (EOFError, OSError):  # the coordinator closed the pipe or died
                return
            if request == "stop":
                getattr(state, "close", lambda: None)()
                conn.send(("ok", None))
                return
            conn.send(("ok", state.handle(request)))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))
        os._exit(1)  # skip atexit handlers that could block on a broken process group


# -- the coordinator side ----------------------------------------------------------------------
def _shutdown(procs: list, conns: list, grace_s: float = 5.0) -> None:
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            conn.send("stop")
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5.0)
    for conn in conns:
        conn.close()


def fork_context(preload: tuple[str, ...] = ()):
    """multiprocessing's fork-server context, asking the server to import ``preload`` (with
    torch) when it starts. The server is one per process, shared with other users (the memory
    probe's): their preload is kept, and only what is asked before it starts is imported there;
    a worker imports anything else it needs itself."""
    from multiprocessing import forkserver

    import torch.multiprocessing as tmp  # registers the shared-memory tensor reductions

    ctx = tmp.get_context("forkserver")
    asked = list(getattr(forkserver._forkserver, "_preload_modules", None) or [])
    ctx.set_forkserver_preload(list(dict.fromkeys([*asked, "torch", *preload])))
    return ctx


class WorkerGroup:
    """``world`` worker processes (forked from a clean fork server: no inherited threads or
    locks), one pipe each."""

    def __init__(
        self,
        setup: Callable[[int, Any], Any],
        payloads: list[Any],
        *,
        name: str,
        timeout_s: float,
        start_timeout_s: float | None = None,
        env: dict[str, str] | None = None,
        preload: tuple[str, ...] = (),
    ):
        """``timeout_s`` bounds each request; start-up (importing torch, receiving the model) is
        bounded by ``start_timeout_s`` (default: the larger of ``timeout_s`` and 600 s). ``env``
        is added to the workers' environment; ``preload``: modules the fork server imports."""
        ctx = fork_context(preload)
        self.name, self.timeout_s = name, timeout_s
        self.procs, self.conns = [], []
        self.closed = False
        child_env = {**os.environ, **(env or {})}
        for rank, payload in enumerate(payloads):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(setup, rank, child, payload, os.getpid(), child_env),
                name=f"slimbench-{name}-{rank}",
                daemon=True,  # multiprocessing terminates daemons when this process exits
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        # their CPU time is the measured work's, not contention (efficiency's `noisy` flag)
        machine.add_measured_pids(self.pids)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)
        atexit.register(self._finalizer)
        self.infos = self._collect(
            range(len(payloads)), what="start-up", timeout_s=start_timeout_s or max(timeout_s, 600.0)
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _fail(self, message: str) -> WorkerError:
        self.close()
        return WorkerError(f"{self.name}: {message}")

    def _death(self, rank: int, what: str) -> str:
        code = self.procs[rank].exitcode
        signal_note = f" (signal {-code})" if code is not None and code < 0 else ""
        return f"worker {rank} (pid {self.procs[rank].pid}) died during {what} with exit code {code}{signal_note}"

    def _collect(self, ranks, *, what: str, timeout_s: float | None = None) -> list[Any]:
        """Wait for one reply from each rank; raise WorkerError on error, death or timeout."""
        pending = set(ranks)
        replies: dict[int, Any] = {}
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        while pending:
            for rank in sorted(pending):
                conn = self.conns[rank]
                if conn.poll(0):
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):  # it died: say how, once its exit code is known
                        self.procs[rank].join(2.0)
                        raise self._fail(self._death(rank, what)) from None
                    if status == "error":
                        raise self._fail(f"worker {rank} (pid {self.procs[rank].pid}) failed during {what}: {value}")
                    replies[rank] = value
                    pending.discard(rank)
            for rank in sorted(pending):
                proc = self.procs[rank]
                if not proc.is_alive() and not self.conns[rank].poll(0):
                    raise self._fail(self._death(rank, what))
            if pending and time.monotonic() > deadline:
                raise self._fail(f"no reply from worker(s) {sorted(pending)} within {timeout_s} s during {what}")
            if pending:
                self.conns[min(pending)].poll(POLL_SLICE_S)
        return [replies[r] for r in sorted(replies)]

    def request(self, message: Any, *, what: str = "a request") -> list[Any]:
        """Send ``message`` to every worker; return their replies in rank order."""
        if self.closed:
            raise WorkerError(f"{self.name}: the worker processes were shut down")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(message)
            except (OSError, ValueError) as exc:
                raise self._fail(f"cannot send to worker {rank} (pid {self.procs[rank].pid}): {exc}") from None
        return self._collect(range(len(self.conns)), what=what)

    def close(self) -> None:
        """Stop every worker (kill after a grace period) and reap them; idempotent."""
        if not self.closed:
            self.closed = True
            machine.remove_measured_pids(self.pids)
            self._finalizer()
            atexit.unregister(self._finalizer)


class EchoState:
    """A trivial worker for tests of the group's mechanics (no model): echo, sleep, raise, exit."""

    def __init__(self, rank: int, payload: Any):
        self.rank = rank

    def info(self) -> dict[str, int]:
        return {"pid": os.getpid(), "rank": self.rank}

    def handle(self, req: dict[str, Any]) -> Any:
        if req["op"] == "sleep" and self.rank in req.get("ranks", (self.rank,)):
            time.sleep(req["seconds"])
        elif req["op"] == "burn":  # busy until this process used `seconds` of CPU
            end = time.process_time() + req["seconds"]
            while time.process_time() < end:
                pass
        elif req["op"] == "raise" and self.rank == req["rank"]:
            raise RuntimeError(f"requested failure on rank {self.rank}")
        elif req["op"] == "exit" and self.rank == req["rank"]:
            os._exit(3)
        elif req["op"] == "env":  # what the worker's environment holds (the group's env included)
            return {"rank": self.rank, "echo": os.environ.get(req["name"])}
        return {"rank": self.rank, "echo": req.get("value")}
