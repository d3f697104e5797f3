"""Groups as Ray tasks, on an existing cluster or on a local Ray started for the run.

Ray is an optional extra (``pip install -r requirements-ray.txt`` or ``pip install
'slimbench[ray]'``); only this module imports it. Each group is one Ray task asking for the
group's CPUs, GPUs and memory; its events stream back (a Ray generator task) and the driver
writes the records, exactly as for the local executors.

Timed cells run alone on their node: every node offers one unit of the custom resource
``slimbench_node``; a group with a timed task asks for all of it, any other group for a
sliver, so Ray never places a timed group beside another SlimBench group. A local Ray gets the
resource automatically; a cluster's nodes must be started with it, e.g.
``ray start --head --resources='{"slimbench_node": 1}'`` (the run refuses timed cells
otherwise). Every node needs the same SlimBench (and its model/data packages) installed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from slimbench.errors import SuiteError
from slimbench.specs import CellSpec
from slimbench.sweep.executors.resources import GIB, Machine, Resources, unit_resources

try:
    import ray
except ImportError:  # the extra is not installed: RayExecutor says how to get it
    ray = None

NODE_RESOURCE = "slimbench_node"
SHARE = 0.001  # what a group without a timed task takes of its node's unit (Ray's resolution is 1e-4)
REPO = Path(__file__).resolve().parents[2]
_FROZEN = False  # set in a Ray worker once its imports are frozen (slimbench.measure.clocks.freeze_imports)


def _group_task(cells_json: list[str], suite_source: str, limit: int | None, cpus: float, preload: tuple,
                options=None):
    """Runs on a Ray worker: one unit of groups, its events yielded back to the driver."""
    import importlib

    import psutil

    from slimbench.zoo.hub import offline_defaults

    offline_defaults()
    for module in preload:  # plugins registered by import
        importlib.import_module(module)
    from slimbench.sweep.runner import iter_group

    global _FROZEN
    if not _FROZEN:  # a Ray worker runs task after task: its imports are frozen before its first model
        from slimbench.measure.clocks import freeze_imports

        freeze_imports()
        _FROZEN = True

    cells = [CellSpec.model_validate_json(j) for j in cells_json]
    if limit is None:  # this task's share of 90% of its node's memory
        limit = int(0.9 * psutil.virtual_memory().total * min(1.0, cpus / (os.cpu_count() or 1)))
    yield from iter_group(cells, suite_source, memory_limit=limit, options=options)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """An unreachable address fails at once with a clear message (ray.init would retry for long)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SuiteError(f"--address {address!r}: expected host:port (e.g. 10.0.0.5:6379), ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise SuiteError(
            f"--address {address}: cannot reach a Ray cluster there ({err.strerror or err}). Start one with "
            "`ray start --head`, or leave out --address to start a local Ray for this run"
        ) from None


class RayExecutor:
    def __init__(
        self,
        address: str | None = None,
        *,
        max_groups: int | None = None,
        memory_limit: int | None = None,
        timeout: float | None = None,
        preload: tuple[str, ...] = (),
    ):
        if ray is None:
            raise SuiteError(
                "--executor ray needs Ray, an optional extra: pip install -r requirements-ray.txt "
                "(or pip install 'slimbench[ray]')"
            )
        if max_groups is not None and max_groups < 1:
            raise SuiteError(f"--workers must be a positive number, got {max_groups}")
        if timeout is not None and not timeout > 0:
            raise SuiteError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.address = address
        self.max_groups = max_groups
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.preload = tuple(preload)
        self.name = "ray"
        self.slots = max_groups or 1
        self.startup_seconds: float | None = None
        self._started = False
        self._own_cluster = False
        self._nodes: list[dict] = []
        self._node_resource = False
        self._tasks: dict[int, list] = {}  # gid -> [generator, started (monotonic) or None]
        self._remote = None

    # -- connecting ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        env = {
            k: os.environ[k]
            for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS", "TOKENIZERS_PARALLELISM",
                      "SLIMBENCH_CACHE", "SLIMBENCH_ARTIFACTS")  # the model and artifact caches the run chose
            if k in os.environ
        }
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # SlimBench runs offline: no usage report
        t0 = time.perf_counter()
        try:
            if self.address:
                check_reachable(self.address)
                ray.init(address=self.address, runtime_env={"env_vars": env}, log_to_driver=False)
            else:
                machine = Machine.this()
                paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
                ray.init(
                    num_cpus=machine.cpus,
                    num_gpus=machine.gpus,
                    resources={NODE_RESOURCE: 1},
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {**env, "PYTHONPATH": os.pathsep.join(paths)}},
                )
                self._own_cluster = True
        except SuiteError:
            raise
        except Exception as err:  # Ray's own errors: one line, not a traceback
            raise SuiteError(f"--executor ray: could not start or reach Ray: {type(err).__name__}: {err}") from None
        self.startup_seconds = time.perf_counter() - t0
        self._started = True
        self._nodes = [n for n in ray.nodes() if n.get("Alive")]
        self._node_resource = any(NODE_RESOURCE in n["Resources"] for n in self._nodes)
        cpus = sum(n["Resources"].get("CPU", 0) for n in self._nodes)
        self.slots = self.max_groups or max(1, int(cpus))
        where = f"cluster {self.address}"
        if self._own_cluster:
            where = f"local Ray started in {self.startup_seconds:.1f} s"
        self.name = f"ray ({where}: {len(self._nodes)} node(s), {cpus:g} CPUs)"
        self._remote = ray.remote(max_retries=0)(_group_task)

    def check(self, groups: list[list[CellSpec]]) -> None:
        """A group no node of the cluster can run: one error before anything runs."""
        for cells in groups:
            req = unit_resources(cells)
            if req.exclusive and not self._node_resource:
                raise SuiteError(
                    f"{cells[0].task.name} is a timed task, which must run alone on a node, and no node of this "
                    f"Ray cluster offers the resource {NODE_RESOURCE!r}: start the nodes with "
                    f"--resources='{{\"{NODE_RESOURCE}\": 1}}'"
                )
            if not any(self._fits(n["Resources"], req) for n in self._nodes):
                biggest = max(self._nodes, key=lambda n: n["Resources"].get("CPU", 0))["Resources"]
                raise SuiteError(
                    f"no node of the Ray cluster can run {cells[0].model.name} | {cells[0].method.label()}: "
                    f"it asks for {req.describe()}; the largest node has {biggest.get('CPU', 0):g} CPUs, "
                    f"{biggest.get('GPU', 0):g} GPUs, {biggest.get('memory', 0) / GIB:.1f} GiB memory"
                )

    @staticmethod
    def _fits(have: dict, req: Resources) -> bool:
        return (
            have.get("CPU", 0) >= req.cpus
            and have.get("GPU", 0) >= req.gpus
            and have.get("memory", 0) >= req.memory_bytes
            and (not req.exclusive or have.get(NODE_RESOURCE, 0) >= 1)
        )

    # -- running ---------------------------------------------------------------------------------
    def has_room(self, req: Resources) -> bool:
        return len(self._tasks) < self.slots  # Ray itself places the groups by their requests

    def submit(self, gid: int, cells: list[CellSpec], req: Resources, suite_source: str) -> None:
        opts: dict = {"num_cpus": req.cpus, "num_gpus": req.gpus}
        if req.memory_bytes:
            opts["memory"] = req.memory_bytes
        if self._node_resource:
            opts["resources"] = {NODE_RESOURCE: 1.0 if req.exclusive else SHARE}
        limit = req.memory_bytes or self.memory_limit
        cells_json = [c.model_dump_json() for c in cells]
        gen = self._remote.options(**opts).remote(cells_json, suite_source, limit, req.cpus, self.preload,
                                                  getattr(self, "options", None))
        self._tasks[gid] = [gen, None]

    def poll(self, timeout: float) -> list[tuple[int, tuple]]:
        if not self._tasks:
            return []
        by_gen = {id(t[0]): gid for gid, t in self._tasks.items()}
        ready, _ = ray.wait([t[0] for t in self._tasks.values()], num_returns=1, timeout=timeout)
        events: list[tuple[int, tuple]] = []
        for gen in ready:
            gid = by_gen[id(gen)]
            try:
                event = ray.get(next(gen))
            except StopIteration:
                events.append((gid, ("end", None)))
                del self._tasks[gid]
                continue
            except ray.exceptions.RayError as err:
                msg = str(err).strip().splitlines()[-1][:500] if str(err).strip() else ""
                events.append((gid, ("end", {"type": type(err).__name__, "message": f"the Ray task failed: {msg}"})))
                del self._tasks[gid]
                continue
            if event[0] == "started":
                self._tasks[gid][1] = time.monotonic()
            events.append((gid, event))
        events += self._timeouts()
        return events

    def _timeouts(self) -> list[tuple[int, tuple]]:
        out = []
        if self.timeout is None:
            return out
        now = time.monotonic()
        for gid, (gen, started) in list(self._tasks.items()):
            if started is not None and now - started > self.timeout:
                ray.cancel(gen, force=True)
                del self._tasks[gid]
                msg = f"the group exceeded its timeout of {self.timeout:g} s and was killed"
                out.append((gid, ("end", {"type": "Timeout", "message": msg})))
        return out

    def close(self) -> None:
        for gen, _ in self._tasks.values():
            with contextlib.suppress(Exception):  # best effort on the way out
                ray.cancel(gen, force=True)
        self._tasks.clear()
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False
