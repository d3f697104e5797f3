"""Where groups of cells run.

An executor takes groups (cells sharing a model, a method config and hardware) from the
driver (``slimbench.sweep.driver``) and gives back the events of ``runner.iter_group``:
the driver alone writes records and holds the claims, so every executor fills the store the
same way.

- ``LocalExecutor()``: this process, one group after another (the default).
- ``LocalExecutor(workers=N)``: N worker processes on this machine, scheduled by the groups'
  CPU/GPU/memory requests; each worker is watched for its timeout and memory limit.
- ``RayExecutor(address)``: groups as Ray tasks on a cluster, or on a local Ray started for
  the run (``slimbench.sweep.executors.ray_executor``; imports Ray, an optional extra).

The interface (duck-typed): ``check(groups)`` raises ``SuiteError`` for a group nobody can
run; ``start()``; ``has_room(resources)``; ``submit(gid, cells, resources, suite_source)``;
``poll(timeout) -> [(gid, event)]`` where an event is one of ``iter_group``'s or
``("end", reason | None)`` when the group is over (reason: why it stopped early); ``close()``.
"""

from __future__ import annotations

from slimbench.sweep.executors.local import InProcessExecutor, WorkerPoolExecutor


def LocalExecutor(
    workers: int | None = None,
    *,
    isolate: bool = False,
    timeout: float | None = None,
    memory_limit: int | None = None,
    preload: tuple[str, ...] = (),
):
    """This process (``workers=None``) or a pool of ``workers`` processes."""
    if workers is None:
        return InProcessExecutor(memory_limit=memory_limit)
    return WorkerPoolExecutor(workers, isolate=isolate, timeout=timeout, memory_limit=memory_limit, preload=preload)


__all__ = ["InProcessExecutor", "LocalExecutor", "WorkerPoolExecutor"]
