"""Servers and the load generator for real, inside a network namespace that has only loopback.

Each test re-runs itself under ``unshare --net`` (root) with ``lo`` up, so that whatever it
starts cannot be reached from, or reach, anything but this namespace's loopback; inside, the
test first checks that loopback is the only interface. What is checked:

- a server process: ready only when it answers; stopped with its children; one that exits or
  never answers becomes a ServerError carrying its log; one listening beyond loopback is refused;
- the measurement chain against GuideLLM's own mock server, whose latencies are configured: the
  measured TTFT and ITL are at least those (a property that holds at any machine load), errors
  are counted and break the SLO, a server killed mid-run fails the measurement with its log;
- the ``serving`` task on a tiny model through the runner: an ``ok`` record, and no process or
  listening socket left behind; a model whose forward raises: a ``failed`` record with the log;
- the ``serving`` task through llama.cpp (llama-cpp-python's server on the exported GGUF).

Starting a pytest per test in a namespace costs a pytest start-up each, so the module runs in one:
outside, a single test runs this file inside a loopback-only namespace; inside, the class below
holds the checks (each class test is collected only there).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest
from netns import loopback_namespace_problem

from slimbench.engines.serving import loadgen
from slimbench.engines.serving.process import ServerError, ServerProcess, listening_beyond_loopback
from slimbench.engines.workers import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent
INSIDE = os.environ.get("SLIMBENCH_LOOPBACK_NETNS") == "1"


NETNS_PROBLEM = None if INSIDE else loopback_namespace_problem()
pytestmark = pytest.mark.skipif(
    NETNS_PROBLEM is not None, reason=f"servers run in a loopback-only namespace: {NETNS_PROBLEM}"
)


GROUPS: dict[str, list[str]] = {"servers": [], "task": []}  # two halves, so that two test workers share them


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_check_here_passes_inside_a_loopback_only_namespace(group):
    """Outside: run this file's checks of ``group`` in one pytest inside a namespace with only loopback."""
    select = " or ".join(GROUPS[group])
    cmd = f"ip link set lo up && exec {shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider -rs " \
          f"{shlex.quote(str(Path(__file__).resolve()))} -k {shlex.quote(select)}"
    env = {**os.environ, "SLIMBENCH_LOOPBACK_NETNS": "1"}
    out = subprocess.run(["unshare", "--net", "sh", "-c", cmd], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    assert out.returncode == 0, (out.stdout[-8000:], out.stderr[-3000:])
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-3000:]
    skipped = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    if skipped:  # an optional engine missing inside: say which checks did not run
        warnings.warn("inside the namespace: " + "; ".join(skipped), stacklevel=1)


test_every_check_here_passes_inside_a_loopback_only_namespace.__test__ = not INSIDE


def inside(group: str):
    """A check collected only inside the namespace (outside, the test above runs it there)."""
    def mark(test):
        test.__test__ = INSIDE
        GROUPS[group].append(test.__name__)
        return test
    return mark


@pytest.fixture(autouse=True)
def only_loopback():
    if INSIDE:
        assert set(psutil.net_if_addrs()) == {"lo"}, psutil.net_if_addrs()


FAKE = """
import http.server, json, os, subprocess, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
print("fake server starting", mode, flush=True)
if mode == "exit":
    print("boom: cannot load the model", flush=True); sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
if mode == "never":
    time.sleep(600)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"data": []}')
    def log_message(self, *a): pass
host = "0.0.0.0" if mode == "exposed" else "127.0.0.1"
http.server.HTTPServer((host, port), H).serve_forever()
"""


def fake_server(tmp_path: Path, mode: str) -> ServerProcess:
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    port = free_loopback_port()
    return ServerProcess("fake", [sys.executable, str(script), mode, str(port)], port, tmp_path / f"{mode}.log")


@inside("servers")
def test_server_process_starts_stops_with_its_children(tmp_path):
    server = fake_server(tmp_path, "ok")
    server.start(300)
    pids = server.pids()
    assert len(pids) == 3 and server.alive() and not listening_beyond_loopback(pids)  # guard, server, its child
    server.stop()
    time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not server.alive()
    server.stop()  # idempotent


@inside("servers")
def test_server_failures_carry_their_log(tmp_path):
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*boom: cannot load the model"):
        fake_server(tmp_path, "exit").start(300)
    never = fake_server(tmp_path, "never")
    with pytest.raises(ServerError, match=r"not ready after 3 s(.|\n)*fake server starting never"):
        never.start(3)
    never.stop()
    exposed = fake_server(tmp_path, "exposed")
    exposed.start(300)
    try:
        assert listening_beyond_loopback(exposed.pids()) == [f"0.0.0.0:{exposed.port}"]
    finally:
        exposed.stop()


@inside("servers")
def test_a_cell_killed_outright_leaves_no_server(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from slimbench.engines.serving.process import ServerProcess
        from slimbench.engines.workers import free_loopback_port
        port = free_loopback_port()
        cmd = [sys.executable, {str(script)!r}, "ok", str(port)]
        s = ServerProcess("fake", cmd, port, Path({str(tmp_path)!r}) / "p.log")
        s.start(300)
        print(" ".join(map(str, s.pids())), flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 3  # the guard, the server, the server's own child
    proc.kill()  # SIGKILL: no finally, no atexit
    proc.wait()

    def alive(pid: int) -> bool:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)  # the whole group followed the cell


# -- against GuideLLM's mock server -------------------------------------------------------------------
needs_guidellm = pytest.mark.skipif(loadgen.unavailable() is not None, reason=str(loadgen.unavailable()))


def mock_server(tmp_path: Path, *extra: str) -> ServerProcess:
    port = free_loopback_port()
    cmd = [str(loadgen.executable()), "mock-server", "--host", "127.0.0.1", "--port", str(port), "--model",
           "slimbench", "--ttft-ms", "60", "--itl-ms", "15", *extra]
    return ServerProcess("guidellm mock", cmd, port, tmp_path / "mock.log", env=loadgen.child_env())


def plan(tmp_path: Path, server, profile: dict, *, max_requests: int = 8):
    from slimbench.engines.serving import session
    from slimbench.engines.serving.workload import WorkloadSpec, build_rows, write_rows
    from slimbench.zoo.models import gpt2_tokenizer

    tok = gpt2_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    rows = build_rows(tok, WorkloadSpec(requests=64, max_prompt_tokens=48, min_output_tokens=4, max_output_tokens=12))
    write_rows(rows, tmp_path / "requests.jsonl")
    scenario = loadgen.scenario(target=server.url, model="slimbench", tokenizer=tmp_path / "tok",
                                data=tmp_path / "requests.jsonl", output=tmp_path / "report.json", profile=profile,
                                max_seconds=120, max_requests=max_requests, warmup_requests=0, request_timeout_s=30,
                                seed=0)
    return session.Plan(workdir=tmp_path, scenario=scenario, warm_requests=[], start_timeout_s=600,
                        run_timeout_s=600, request_timeout_s=30)


@inside("servers")
@needs_guidellm
def test_measured_latencies_are_at_least_the_mock_servers(tmp_path):
    from slimbench.engines.serving import analysis, session

    server = mock_server(tmp_path)
    m = session.measure(server, plan(tmp_path, server, {"kind": "concurrent", "streams": [1, 2]}))
    assert not server.alive()
    points = analysis.load_points(m.report)
    assert [(p.strategy, p.target) for p in points] == [("concurrent", 1.0), ("concurrent", 2.0)]
    for p in points:
        # as GuideLLM counts them: those overlapping its window (under load the last may fall out of it)
        assert 6 <= p.successful == p.reported["request_totals"]["successful"] <= 8 and p.errored == 0
        assert min(p.samples["ttft_ms"]) >= 60  # the mock sleeps 60 ms before the first token
        assert min(p.samples["itl_ms"]) >= 15 * 0.9  # and ~15 ms between tokens (its sleep granularity)
        assert p.request_throughput > 0 and p.output_tokens_per_s > 0
        p.cpu = analysis.cpu_between(m.timeline, p.start, p.end)
        assert p.cpu["server_cores"] > 0 and p.cpu["loadgen_cores"] > 0
    assert m.server_cpu_s > 0 and m.loadgen_cpu_s > m.server_cpu_s * 0  # both measured, apart
    s = analysis.summarize(points, analysis.SLO(ttft_ms=10, itl_ms=None))
    assert s["max_rps_within_slo"] == 0.0  # nothing can meet a TTFT below the server's own 60 ms


@inside("servers")
@needs_guidellm
def test_errors_are_counted_and_break_the_slo(tmp_path):
    from slimbench.engines.serving import analysis, session

    server = mock_server(tmp_path, "--fail-after-requests", "6")
    m = session.measure(server, plan(tmp_path, server, {"kind": "synchronous"}, max_requests=10))
    (p,) = analysis.load_points(m.report)
    assert p.errored + p.incomplete >= 4 and p.successful <= 6 and p.errors
    assert not analysis.judge(p, analysis.SLO(ttft_ms=60_000, itl_ms=None))["met"]


@inside("servers")
@needs_guidellm
def test_a_server_that_dies_mid_run_fails_with_its_log(tmp_path):
    from slimbench.engines.serving import session

    server = mock_server(tmp_path, "--ttft-ms", "500")
    p = plan(tmp_path, server, {"kind": "synchronous"}, max_requests=200)

    def kill_when_busy():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (tmp_path / "scenario.json").exists():
            time.sleep(0.2)
        time.sleep(8)  # the generator is running by now
        leader = server.proc
        if leader is not None:
            for proc in psutil.Process(leader.pid).children(recursive=True):
                proc.kill()
            leader.kill()

    threading.Thread(target=kill_when_busy, daemon=True).start()
    with pytest.raises(ServerError, match=r"(server died|load generator)(.|\n)*last log lines"):
        session.measure(server, p)
    assert not psutil.Process().children(recursive=True)  # nothing left: generator and server reaped


# -- the task, through the runner ---------------------------------------------------------------------
# Load points end at max_requests (max_seconds only bounds them): how many requests a point gets
# must not depend on how busy the machine is.
SUITE = """
models: [tiny-llama]
methods: [baseline]
tasks:
  - {name: serving, profile: concurrent, streams: [1, 2], max_requests: 6, max_seconds: 300, warmup_requests: 1,
     dataset_requests: 32, max_prompt_tokens: 48, max_output_tokens: 8, continuous_batching: CB}
hardware: {threads: 1}
"""


def run_suite(tmp_path: Path, text: str):
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore
    from slimbench.sweep.suite import load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    store = ResultStore(tmp_path / "results")
    run_cells(load_suite(str(path)).cells(), store, show_progress=False, log=lambda s: None)
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*.json"))]


@inside("task")
@needs_guidellm
@pytest.mark.parametrize("cb", ["false", "true"])
def test_serving_task_on_a_tiny_model_leaves_nothing_behind(tmp_path, cb):
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()  # transformers sets its logger's level on first use: before the reading
    levels = {n: logging.getLogger(n).level for n in ("transformers", "uvicorn.error", "uvicorn.access")}
    (rec,) = run_suite(tmp_path, SUITE.replace("CB", cb))
    assert rec["status"] == "ok", rec["error"]
    assert levels == {n: logging.getLogger(n).level for n in levels}  # the process' logging as it was
    d, m = rec["task_details"], rec["metrics"]
    assert d["server"]["name"] == "transformers" and d["server"]["settings"]["continuous_batching"] == (cb == "true")
    assert [p["target"] for p in d["load_points"]] == [1.0, 2.0]
    # GuideLLM's warm-up (first request) and its measured window: the same requests counted as it counts them
    for p in d["load_points"]:
        assert 3 <= p["successful"] == p["reported"]["request_totals"]["successful"] <= 5, p["reported"]
    # every request got exactly the tokens it asked for (ignore_eos through transformers' server)
    assert all(p["samples"]["output_tokens"] and min(p["samples"]["output_tokens"]) >= 4 for p in d["load_points"])
    assert m["max_request_throughput"]["value"] > 0 and m["loadgen_cpu_s"]["value"] > 0
    assert 0 < m["loadgen_cpu_share"]["value"] < 1
    assert not psutil.Process().children(recursive=True)
    me = psutil.Process()
    assert not [c for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


@inside("task")
def test_a_model_that_fails_becomes_a_failed_record_with_the_server_log(tmp_path, monkeypatch):
    import slimbench.sweep.runner as runner

    original = runner.load_and_compress

    def broken(*a, **kw):
        lm, report = original(*a, **kw)

        def forward(*args, **kwargs):
            raise RuntimeError("the kernel exploded")

        lm.model.forward = forward
        return lm, report

    monkeypatch.setattr(runner, "load_and_compress", broken)
    monkeypatch.setattr(loadgen, "unavailable", lambda: None)  # it fails before the generator is needed
    (rec,) = run_suite(tmp_path, SUITE.replace("CB", "false"))
    assert rec["status"] == "failed"
    msg = rec["error"]["message"]
    assert "warm-up request" in msg and "last log lines" in msg and "the kernel exploded" in msg, msg
    assert not psutil.Process().children(recursive=True)


def llama_cpp_unavailable() -> str | None:
    from slimbench.engines.serving import servers

    try:
        servers.llama_flavour("auto")
    except ValueError as e:
        return str(e)
    return None


@inside("task")
@needs_guidellm
def test_serving_through_llama_cpp_on_the_exported_gguf(tmp_path):
    why = llama_cpp_unavailable()
    if why:
        pytest.skip(why)
    from export_helpers import tiny_bpe_llama
    from slimbench.tasks.serving import ServingConfig, evaluate

    from slimbench.specs import HardwareSpec
    from slimbench.task import TaskContext

    cfg = ServingConfig(server="llama.cpp", profile="concurrent", streams=[1, 2], max_requests=6, max_seconds=300,
                        dataset_requests=32, max_prompt_tokens=48, min_output_tokens=6, max_output_tokens=6,
                        gguf_weights="F32", request_timeout_s=600, warm_requests=1)
    res = evaluate(tiny_bpe_llama(), cfg, TaskContext(hardware=HardwareSpec(threads=1)))
    d, m = res.details, res.metrics
    assert d["server"]["name"] == "llama.cpp" and d["server"]["flavour"] in ("native", "python")
    assert d["server"]["settings"]["gguf"]["source"] == "exported for this cell"
    assert [p["target"] for p in d["load_points"]] == [1.0, 2.0]
    for p in d["load_points"]:
        assert p["successful"] == p["reported"]["request_totals"]["successful"] >= 3, p["errors"]
        # the random model may stream tokens that are pieces of one UTF-8 character, which the server
        # holds back: an empty answer, which GuideLLM counts as an error; any other error fails
        assert all("empty response payload" in e for e in p["errors"]), p["errors"]
        # the random model would often stop at its end-of-text token: the server is told not to
        assert min(p["samples"]["output_tokens"]) >= 5, p["samples"]["output_tokens"]
    assert m["server_cpu_s"].value > 0 and m["loadgen_cpu_s"].value > 0
    assert not psutil.Process().children(recursive=True)


@inside("task")
@needs_guidellm
def test_serving_through_vllm_on_its_exported_folder(tmp_path):
    from slimbench.engines import vllm

    why = vllm.unavailable()
    if why:
        pytest.skip(why)
    from export_helpers import tiny_bpe_llama
    from slimbench.tasks.serving import ServingConfig, evaluate

    from slimbench.method import apply_method
    from slimbench.specs import HardwareSpec, MethodSpec, StepSpec
    from slimbench.task import TaskContext

    hw = HardwareSpec(threads=1)
    lm = tiny_bpe_llama(hidden=128, heads=2, kv_heads=1)  # head size 64: vLLM's CPU attention
    step = {"check_windows": 1, "check_seqlen": 32, "max_model_len": 256, "sequences": 2}
    apply_method(lm, MethodSpec(steps=(StepSpec(name="vllm", params=step),)), hw)
    try:
        cfg = ServingConfig(server="auto", profile="concurrent", streams=[2], max_requests=6, max_seconds=300,
                            dataset_requests=32, max_prompt_tokens=48, min_output_tokens=6, max_output_tokens=6,
                            request_timeout_s=600, warm_requests=1)
        res = evaluate(lm, cfg, TaskContext(hardware=hw))
    finally:
        lm.model.close()
    d, m = res.details, res.metrics
    assert d["server"]["name"] == "vllm" and d["server"]["version"] == "0.32.0"
    point = d["load_points"][0]
    assert point["successful"] == point["reported"]["request_totals"]["successful"] >= 3, point["errors"]
    assert all("empty response payload" in e for e in point["errors"]), point["errors"]
    assert min(point["samples"]["output_tokens"]) >= 5, point["samples"]["output_tokens"]
    assert m["server_cpu_s"].value > 0
    assert not psutil.Process().children(recursive=True)


@inside("servers")
def test_llama_server_prefills_a_repeated_prompt_again(tmp_path):
    """Prompt caches are off (the serving protocol's load points repeat prompts): llama-server
    evaluates every token of a prompt it has just served again, by its own count; the same server
    started with its default (cache on) evaluates almost none of it the second time."""
    from slimbench.engines.serving import servers

    why = llama_cpp_unavailable()
    if why or servers.llama_flavour("auto") != "native":
        pytest.skip(why or "llama-server is not built (llama-cpp-python's server keeps no prompt cache)")
    from export_helpers import tiny_bpe_llama
    from slimbench.tasks.serving import ServingConfig

    from slimbench.engines.serving.process import http_json
    from slimbench.specs import HardwareSpec
    from slimbench.task import TaskContext

    lm = tiny_bpe_llama()
    cfg = ServingConfig(server="llama.cpp", gguf_weights="F32", max_prompt_tokens=48, min_output_tokens=6,
                        max_output_tokens=6)
    ctx = TaskContext(hardware=HardwareSpec(threads=1))
    body = {"prompt": "To be, or not to be, that is the question: whether 'tis nobler in the mind", "n_predict": 2}

    def prompt_tokens_evaluated(server) -> list[int]:
        server.start(120)
        try:
            return [http_json(server.url + "/completion", body, timeout=60)[1]["timings"]["prompt_n"]
                    for _ in range(2)]
        finally:
            server.stop()

    (tmp_path / "off").mkdir()
    (tmp_path / "default").mkdir()
    off = servers.build("llama.cpp", lm, cfg, ctx, tmp_path / "off")
    assert off.settings["prompt_cache"] is False
    first, again = prompt_tokens_evaluated(off)
    assert again == first > 5
    default = servers.build("llama.cpp", lm, cfg, ctx, tmp_path / "default")
    at = default.cmd.index("--cache-ram")
    default.cmd = [a for i, a in enumerate(default.cmd) if i not in (at, at + 1) and a != "--no-cache-prompt"]
    first, again = prompt_tokens_evaluated(default)
    assert first > 5 and again <= 1
