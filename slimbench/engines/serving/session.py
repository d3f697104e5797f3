"""One serving measurement: server up, warm, driven by GuideLLM, CPU accounted per side, server down.

``measure(server, plan)`` is the whole life of a cell's server, in a ``try/finally`` that stops
it whatever happens (an exception, a timeout, Ctrl-C):

1. start the server on 127.0.0.1 at a free port and wait until it answers; refuse it if any of
   its processes listens outside loopback;
2. warm it with a few real requests (first-call costs: allocation, lazy initialisation) that
   are not measured;
3. run GuideLLM on the scenario as a child process, bounded in time, while a sampler thread
   records every ``SAMPLE_S`` the cumulative CPU time of the server, of the load generator
   (its process tree) and of the whole machine;
4. stop the server; read the report.

Failures raise ``ServerError`` with the server's last log lines: the server exits or stops
answering (before ready or during the run), the generator exceeds its time bound or exits
with an error, or every request of a load point failed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from slimbench.engines.serving import loadgen
from slimbench.engines.serving.process import ServerError, http_json, listening_beyond_loopback, tree_cpu_seconds

SAMPLE_S = 0.5


@dataclass
class Plan:
    workdir: Path
    scenario: dict[str, Any]
    warm_requests: list[dict[str, Any]]  # {"prompt", "max_tokens"}
    start_timeout_s: float
    run_timeout_s: float
    request_timeout_s: float
    loadgen_cpus: tuple[int, ...] = ()


@dataclass
class Measurement:
    report: dict[str, Any]
    timeline: list[tuple[float, float, float, float]]
    server_cpu_s: float
    loadgen_cpu_s: float
    wall_s: float
    machine_busy_cores: float
    warmup_s: float
    server_settings: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Sampler(threading.Thread):
    """Cumulative CPU seconds of (server, load generator, machine) every ``SAMPLE_S``, with epoch time."""

    def __init__(self, server: Any, run: loadgen.GuideLLMRun) -> None:
        super().__init__(daemon=True, name="serving-cpu-sampler")
        self.server, self.run_ = server, run
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop_evt = threading.Event()
        self._gen_last = 0.0

    def sample(self) -> None:
        pid = self.run_.pid
        if pid is not None and self.run_.returncode is None:
            self._gen_last = max(self._gen_last, tree_cpu_seconds(pid))
        self.samples.append((time.time(), self.server.cpu_seconds(), self._gen_last, machine_busy_seconds()))

    def run(self) -> None:
        while not self._stop_evt.wait(SAMPLE_S):
            with contextlib.suppress(psutil.Error, OSError):
                self.sample()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)


def warm(server: Any, requests: list[dict[str, Any]], timeout_s: float) -> float:
    """Send the warm-up requests one by one; a failure is the server's."""
    t0 = time.perf_counter()
    for req in requests:
        body = {"model": server.model_name, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
                "ignore_eos": True, "temperature": 0.0}
        try:
            status, answer = http_json(server.url + "/v1/completions", body, timeout=timeout_s)
        except OSError as err:
            raise server.error(f"the warm-up request failed: {err}") from None
        if status != 200:
            raise server.error(f"the warm-up request was answered {status}: {str(answer)[:300]}")
    return time.perf_counter() - t0


def measure(server: Any, plan: Plan) -> Measurement:
    """Steps 1-4 of the module docstring; the server is stopped on every path."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    scenario_path = plan.workdir / "scenario.json"
    output = Path(plan.scenario["spec"]["outputs"][0]["path"])
    run = loadgen.GuideLLMRun(scenario_path, plan.workdir / "guidellm.log", cpus=plan.loadgen_cpus)
    sampler = Sampler(server, run)
    try:
        server.start(plan.start_timeout_s)
        exposed = listening_beyond_loopback(server.pids())
        if exposed:
            raise server.error(f"the server listens beyond loopback ({', '.join(exposed)}): refused")
        warm_s = warm(server, plan.warm_requests, plan.request_timeout_s)
        scenario_path.write_text(json.dumps(plan.scenario, indent=1))
        sampler.sample()
        srv0, busy0, t0 = server.cpu_seconds(), machine_busy_seconds(), time.perf_counter()
        run.start()
        sampler.start()
        stopped = run.wait(plan.run_timeout_s, alive=server.alive)
        sampler.stop()
        sampler.sample()
        wall = time.perf_counter() - t0
        srv_cpu, busy = server.cpu_seconds() - srv0, machine_busy_seconds() - busy0
        if stopped:
            raise server.error(f"{stopped}; the load generator's last lines:\n{run.log_tail()}\n--")
        if run.returncode != 0:
            log = run.log_tail()
            hint = ""
            if "No measurement start or end times" in log:
                hint = ("a load point finished no request within max_seconds, and GuideLLM then fails the whole run: "
                        "raise max_seconds, or lower max_output_tokens / max_concurrency; ")
            raise server.error(f"{hint}the load generator exited with code {run.returncode}; its last lines:\n"
                               f"{log}\n--")
        if not server.alive():
            raise server.error("the server died during the run")
        settings = dict(getattr(server, "settings", {}) or {})
        log = server.log_tail()
    finally:
        if sampler.is_alive():
            sampler.stop()
        run.kill()
        server.stop()
    try:
        report = json.loads(output.read_text())
    except (OSError, ValueError) as err:
        raise ServerError(f"the load generator wrote no readable report ({err}); its last lines:\n"
                          f"{run.log_tail()}") from None
    gen_cpu = run.cpu_seconds or 0.0
    return Measurement(report=report, timeline=sampler.samples, server_cpu_s=srv_cpu, loadgen_cpu_s=gen_cpu,
                       wall_s=wall, machine_busy_cores=busy / wall if wall > 0 else 0.0, warmup_s=warm_s,
                       server_settings=settings, log_tail=log)
