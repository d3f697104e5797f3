"""Sweeps at scale on one machine: claims, worker processes, exclusive timed cells, the memory
guard, two drivers on one folder, SIGKILL then rerun, `status` and the ETA."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from scale_helpers import read_log, stamp_tasks_fixture  # noqa: F401 - the stamp_tasks fixture
from scale_helpers import tasks as scale_tasks
from test_runner import fake_record

from slimbench.cli import main
from slimbench.registry import TASKS
from slimbench.sweep.cell_claims import ClaimBook
from slimbench.sweep.driver import run_cells
from slimbench.sweep.executors import LocalExecutor
from slimbench.sweep.status import CostModel, format_status, remaining_seconds, suite_state
from slimbench.sweep.store import ResultStore, comparable_record
from slimbench.sweep.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
PRELOAD = ("scale_register",)


def quiet_store(path) -> ResultStore:
    return ResultStore(path, warn=lambda m: None)


def suite_file(tmp_path, text: str, **fmt) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text).format(log=tmp_path / "log.jsonl", **fmt))
    return path


def assert_one_ok_record_per_cell(store: ResultStore, cells) -> None:
    """Every cell exactly one ok record, every file in runs/ a valid record, no claim left over."""
    for p in store.runs.iterdir():
        assert not p.name.endswith(".tmp"), f"temporary file left: {p.name}"
        if p.suffix == ".json":
            assert store.read(p) is not None, f"broken record {p.name}: {store.problems}"
    ok_ids = sorted(p.stem for p in store.runs.glob("*.json") if ".failed." not in p.name)
    assert ok_ids == sorted(c.run_id for c in cells)
    assert not list((store.root / "claims").glob("*.claim"))


# -- claims ---------------------------------------------------------------------------------------
def test_a_claim_is_exclusive_and_released(tmp_path):
    store = quiet_store(tmp_path)
    a, b = ClaimBook(store), ClaimBook(store)  # two drivers (here in one process)
    assert a.try_claim("c1") == ("claimed", None)
    state, owner = b.try_claim("c1")
    assert state == "owned" and owner.token == a.token and owner.host == socket.gethostname()
    a.release("c1")
    assert b.try_claim("c1") == ("claimed", None)  # free again
    b.release("c1")
    store.write(fake_record("c1"))
    assert a.try_claim("c1") == ("done", None)
    assert not list((tmp_path / "claims").glob("*.claim"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_claim(tmp_path, run_id: str, *, host: str, pid: int, age: float = 0.0, gen: int = 0) -> Path:
    path = tmp_path / "claims" / f"{run_id}.{gen}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "t", "since": "2026-01-01T00:00:00.0Z"}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_dead_owner_is_taken_over_once(tmp_path):
    store = quiet_store(tmp_path)
    plant_claim(tmp_path, "x", host=socket.gethostname(), pid=dead_pid())  # died here: stale at once
    a, b = ClaimBook(store), ClaimBook(store)
    assert a.try_claim("x") == ("claimed", None)
    assert (tmp_path / "claims" / "x.1.claim").exists()  # the next generation, by exclusive create
    assert b.try_claim("x")[0] == "owned"  # only one of the two takes it over
    a.release("x")
    assert not list((tmp_path / "claims").glob("x.*"))  # the dead owner's claim went with it


def test_another_hosts_claim_expires_by_its_heartbeat(tmp_path):
    store = quiet_store(tmp_path)
    book = ClaimBook(store, timeout=30)
    plant_claim(tmp_path, "fresh", host="elsewhere", pid=1, age=5)
    plant_claim(tmp_path, "old", host="elsewhere", pid=1, age=120)
    assert book.try_claim("fresh")[0] == "owned"
    assert book.try_claim("old")[0] == "claimed"


def test_heartbeat_keeps_a_claim_alive(tmp_path):
    store = quiet_store(tmp_path)
    with ClaimBook(store, timeout=1.0, heartbeat=0.1) as a:
        a.try_claim("h")
        time.sleep(1.5)  # longer than the timeout: only the heartbeat keeps it
        other = ClaimBook(store, timeout=1.0)
        other.host = "another-host"  # judged by heartbeat, not by pid
        assert other.try_claim("h")[0] == "owned"
    assert not list((tmp_path / "claims").glob("*.claim"))  # released on exit


# -- executors -------------------------------------------------------------------------------------
# One suite, run once for the module in this process and again in two worker processes: the
# records of the two runs are compared, the workers' log shows whether a timed cell ever shared
# the machine, a rerun of the finished folder must load nothing, and the ETA learns from its
# records. (Each worker process is a cold start that imports torch and transformers: one pool
# serves these four checks.) Two models over two workers: each worker runs a unit of two groups,
# so a worker is reused for a second group; perplexity gives real numbers to compare, the stamp
# tasks (first in each group: the two workers reach them together) a log of when and where each cell ran.
SWEPT = """
models: [tiny-llama, tiny-gpt2]
methods:
  - baseline
  - {{name: magnitude, sparsity: 0.5}}
tasks:
  - {{name: stamp, log: {log}, tag: q, sleep: 1.5}}
  - {{name: perplexity, seqlen: 16, max_windows: 2}}
  - {{name: stamp_timed, log: {log}, tag: t, sleep: 0.3}}
hardware: {{threads: 1}}
"""
QUALITY = """
models: [tiny-llama, tiny-gpt2, tiny-opt]
methods:
  - baseline
  - {{name: magnitude, sparsity: 0.5}}
tasks:
  - {{name: perplexity, seqlen: 16, max_windows: 2}}
hardware: {{threads: 1}}
"""  # specs only: the ETA and resource tests read them, nothing of it runs


# The tests that read the shared run stay on one test worker (make test runs pytest-xdist with
# --dist loadgroup): spread over two, each worker would run the sweep again.
SHARES_THE_RUN = pytest.mark.xdist_group("test_scale-swept")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The suite run in this process (seq/) and by two worker processes (par/): (folder, cells)."""
    tmp = tmp_path_factory.mktemp("swept")
    with pytest.MonkeyPatch.context() as mp:
        for task in scale_tasks():
            mp.setitem(TASKS.entries, task.name, task)
        cells = load_suite(suite_file(tmp, SWEPT)).cells()
        seq, par = quiet_store(tmp / "seq"), quiet_store(tmp / "par")
        s1 = run_cells(cells, seq, show_progress=False, log=lambda s: None)
        s2 = run_cells(cells, par, executor=LocalExecutor(2, preload=PRELOAD), show_progress=False,
                       log=lambda s: None)
    assert len(s1.ok) == len(s2.ok) == len(cells) == 12
    return tmp, cells


@SHARES_THE_RUN
def test_worker_processes_give_the_records_of_a_sequential_run(swept):
    tmp, cells = swept
    seq, par = quiet_store(tmp / "seq"), quiet_store(tmp / "par")
    a = {r["run_id"]: comparable_record(r) for r in seq.records()}
    b = {r["run_id"]: comparable_record(r) for r in par.records()}
    assert len(a) == 12 and a == b
    assert {r["metrics"]["perplexity"]["value"] for r in seq.records() if r["task"]["name"] == "perplexity"} != {1.0}
    assert_one_ok_record_per_cell(par, cells)


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@SHARES_THE_RUN
def test_timed_cells_never_share_the_machine(swept):
    tmp, _ = swept
    log = [e for e in read_log(tmp / "log.jsonl") if e["pid"] != os.getpid()]  # the workers' run
    assert len({e["pid"] for e in log}) == 2  # both workers ran cells
    quality = [e for e in log if '"t"]' not in e["cell"]]
    timed = [e for e in log if '"t"]' in e["cell"]]
    assert len(timed) == 4 and len(quality) == 4
    assert any(overlaps(a, b) for a in quality for b in quality if a["pid"] != b["pid"])  # quality cells do share
    for t in timed:
        assert not any(overlaps(t, o) for o in log if o is not t), "a timed cell ran beside another cell"


def test_memory_guard_fails_the_cell_saying_so(tmp_path, stamp_tasks):
    suite = """
    models: [stamp-a]
    methods: [baseline]
    tasks:
      - {{name: stamp, log: {log}, tag: hog, sleep: 0, allocate_mb: 3000}}
      - {{name: stamp, log: {log}, tag: fine, sleep: 0}}
    hardware: {{threads: 1}}
    """
    cells = load_suite(suite_file(tmp_path, suite)).cells()
    # In this process: what it holds + 600 MB, counted after a collection (earlier tests' garbage,
    # freed by the runner's own collection, would otherwise hide the hog's growth).
    gc.collect()
    limit = psutil.Process().memory_info().rss + 600 * 2**20
    # a SIGINT handler some library installed does not switch the guard off, and is put back
    import signal

    def other_handler(signum, frame):
        pass

    saved = signal.signal(signal.SIGINT, other_handler)
    try:  # put back even if an assertion fails: a leaked handler would disturb later tests
        for name, executor in (
            ("inproc", LocalExecutor(memory_limit=limit)),
            ("worker", LocalExecutor(1, memory_limit=1500 * 2**20, preload=PRELOAD)),
        ):
            store = quiet_store(tmp_path / name)
            summary = run_cells(cells, store, executor=executor, show_progress=False, log=lambda s: None)
            recs = {r["task"]["params"]["tag"]: r for r in store.records(include_failed=True)}
            assert recs["hog"]["status"] == "failed", name
            assert "exceeded the memory limit" in recs["hog"]["error"]["message"]
            assert recs["hog"]["error"]["type"] == "MemoryLimitExceeded"
            assert recs["fine"]["status"] == "ok" or name == "worker"  # a killed worker takes its group along
            assert summary.failed
            assert signal.getsignal(signal.SIGINT) is other_handler
    finally:
        signal.signal(signal.SIGINT, saved)


@SHARES_THE_RUN
def test_rerun_of_a_finished_suite_loads_nothing(swept, tmp_path, stamp_tasks, monkeypatch, capsys):
    folder, _ = swept
    shutil.copytree(folder / "par", tmp_path / "r")  # finished by the workers' run
    args = ["run", str(folder / "suite.yaml"), "--results", str(tmp_path / "r"), "--no-progress", "--workers", "2"]
    import slimbench.sweep.runner

    def no_loading(*a, **k):
        raise AssertionError("a finished suite must not load a model")

    monkeypatch.setattr(slimbench.sweep.runner, "load_model", no_loading)
    monkeypatch.setattr("slimbench.sweep.executors.local.WorkerPoolExecutor.submit", no_loading)
    capsys.readouterr()
    assert main(args) == 0  # writes the report the workers' run did not
    assert "nothing to run" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing to run" in out and "is up to date" in out


# -- two drivers, killed drivers and workers ---------------------------------------------------
DRIVER = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import scale_register  # noqa
from slimbench.sweep.executors import LocalExecutor
from slimbench.sweep.driver import run_cells
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite
workers = {workers}
ex = LocalExecutor(workers, preload=("scale_register",)) if workers else LocalExecutor()
s = run_cells(load_suite({suite!r}).cells(), ResultStore({results!r}), executor=ex, show_progress=False)
print("SUMMARY", json.dumps(s.__dict__))
"""


def start_driver(tmp_path, suite: Path, results: Path, workers: int | None = None) -> subprocess.Popen:
    code = DRIVER.format(root=str(ROOT), tests=str(TESTS), suite=str(suite), results=str(results), workers=workers)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summary_of(out: str) -> dict:
    line = next(x for x in out.splitlines() if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY ") :])


# Two models x two methods: four groups, enough for a driver to be killed mid-sweep with groups
# done, one running and more queued. The test models (tests/scale_helpers.py) load in a
# millisecond and import no transformers model: every driver and worker process here is a cold
# start, and what these tests check is the sweep's machinery, not a model.
MANY = """
models: [{models}]
methods:
  - baseline
  - {{name: magnitude, sparsity: 0.5}}
tasks:
  - {{name: stamp, log: {log}, tag: a, sleep: 0.3}}
  - {{name: stamp, log: {log}, tag: b, sleep: 1.5}}
hardware: {{threads: 1}}
"""
TWO_MODELS = "stamp-a, stamp-b"


def test_two_drivers_on_one_folder_compute_each_cell_once(tmp_path, stamp_tasks):
    suite = suite_file(tmp_path, MANY, models=TWO_MODELS)
    cells = load_suite(suite).cells()
    results = tmp_path / "shared"
    # one driver in another process (with a worker process of its own), one in this process
    other = start_driver(tmp_path, suite, results, workers=1)
    here = run_cells(cells, ResultStore(results), show_progress=False, log=lambda s: None)
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-2000:]
    a, b = here.__dict__, summary_of(out)
    assert not a["failed"] and not b["failed"]
    assert not set(a["ok"]) & set(b["ok"])  # no cell written by both
    assert set(a["ok"]) | set(b["ok"]) == {c.run_id for c in cells}
    log = read_log(tmp_path / "log.jsonl")
    assert len(log) == len(cells) == len({e["cell"] for e in log})  # each cell evaluated exactly once
    assert_one_ok_record_per_cell(quiet_store(results), cells)


def rerun_here(cells, results: Path):
    """The rerun after a kill, by a driver in this process: it finds what the killed run left."""
    return run_cells(cells, ResultStore(results), show_progress=False, log=lambda s: None)


def wait_for(predicate, timeout: float = 300.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def gone(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.parametrize("workers", [None, 2])  # cells in the driver itself / in worker processes that die with it
def test_sigkill_of_the_driver_then_rerun(tmp_path, stamp_tasks, workers):
    suite = suite_file(tmp_path, MANY, models=TWO_MODELS)
    cells = load_suite(suite).cells()
    results = tmp_path / "r"
    driver = start_driver(tmp_path, suite, results, workers=workers)
    log = tmp_path / "log.jsonl"
    claims = results / "claims"
    # mid-sweep: cells done, others claimed (and being computed) by this driver
    wait_for(
        lambda: (len(read_log(log)) >= 3 and any(claims.glob("*.claim"))) or driver.poll() is not None,
        what="three evaluated cells and a held claim",
    )
    driver.send_signal(signal.SIGKILL)
    assert driver.wait() == -signal.SIGKILL, driver.communicate()[1][-2000:]  # it was still running
    worker_pids = {e["pid"] for e in read_log(log)} - {driver.pid}
    wait_for(lambda: gone(worker_pids), 30, "the workers to die with their driver")
    assert len(read_log(log)) < len(cells)  # killed mid-sweep: the rerun has cells to compute
    store = quiet_store(results)
    s = rerun_here(cells, results).__dict__
    assert not s["failed"] and len(s["ok"]) + len(s["skipped"]) == len(cells)
    assert_one_ok_record_per_cell(store, cells)
    assert not list(store.runs.glob("*.failed.*"))  # nothing was lost or half-written


def test_sigkill_of_a_worker_fails_its_cells_and_a_rerun_completes(tmp_path, stamp_tasks):
    # one model, two groups: the killed worker's group fails, a replacement worker runs the other.
    # The driver is this process (a thread kills its worker): the worker's death is the point.
    suite = suite_file(tmp_path, MANY, models="stamp-a")
    cells = load_suite(suite).cells()
    results = tmp_path / "r"
    log = tmp_path / "log.jsonl"
    killed_pid = []

    def kill_the_first_worker():
        wait_for(lambda: read_log(log), what="a first evaluated cell")
        killed_pid.append(read_log(log)[0]["pid"])
        os.kill(killed_pid[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_first_worker, daemon=True)
    killer.start()
    s = run_cells(cells, ResultStore(results), executor=LocalExecutor(1, preload=PRELOAD), show_progress=False,
                  log=lambda s: None)
    killer.join(5)
    assert killed_pid and killed_pid[0] != os.getpid()
    assert s.failed and s.ok
    store = quiet_store(results)
    killed = [r for r in store.records(include_failed=True) if r["status"] == "failed"]
    assert all("killed by SIGKILL" in r["error"]["message"] for r in killed)
    again = rerun_here(cells, results)
    assert again.ok and not again.failed
    assert_one_ok_record_per_cell(store, cells)


# -- status and ETA --------------------------------------------------------------------------------
def test_status_shows_every_state_with_owner_reason_and_eta(tmp_path, stamp_tasks, capsys):
    suite = suite_file(
        tmp_path,
        """
        models: [stamp-a]
        methods: [baseline]
        tasks:
          - {{name: stamp, log: {log}, tag: a, sleep: 0}}
          - {{name: stamp, log: {log}, tag: b, sleep: 0, value: null}}
          - {{name: stamp, log: {log}, tag: c, sleep: 0}}
          - {{name: stamp, log: {log}, tag: d, sleep: 0}}
          - {{name: stamp, log: {log}, tag: e, sleep: 0}}
        hardware: {{threads: 1}}
        """,
    )
    cells = load_suite(suite).cells()
    results = tmp_path / "r"
    store = quiet_store(results)
    run_cells(cells[:2], store, show_progress=False, log=lambda s: None)  # a: ok, b: NaN -> failed
    live = ClaimBook(store)
    live.try_claim(cells[2].run_id)  # c: held by this (live) process
    plant_claim(results, cells[3].run_id, host=socket.gethostname(), pid=dead_pid())  # d: its owner died
    rows = {r.run_id: r for r in suite_state(store, cells)}
    assert [rows[c.run_id].state for c in cells] == ["done", "failed", "running", "stale", "pending"]
    assert "score is NaN" in rows[cells[1].run_id].detail
    assert f"{socket.gethostname()}:{os.getpid()}" in rows[cells[2].run_id].detail
    assert main(["status", str(results), "--suite", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "5 cells: 1 done, 1 running, 1 failed, 1 stale, 1 pending" in out and "ETA" in out
    assert main(["status", str(results)]) == 0  # without a suite: what the folder holds
    assert "4 cells: 1 done, 1 running, 1 failed, 1 stale" in capsys.readouterr().out
    live.release_all()


@SHARES_THE_RUN
def test_eta_is_built_per_kind_not_from_the_first_cell(tmp_path, swept):
    cells = load_suite(suite_file(tmp_path, QUALITY)).cells()
    by = {(c.model.name, c.method.name): c for c in cells}
    cm = CostModel()
    first = by[("tiny-llama", "baseline")]
    cm.add("load", first, 30.0)  # the first load converted the model
    cm.add("compress", first, 0.0)
    cm.add("evaluate", first, 2.0)
    cm.add("load", by[("tiny-llama", "magnitude")], 1.0)
    cm.add("compress", by[("tiny-llama", "magnitude")], 8.0)
    # a later load of the same model costs what a load costs now, not the conversion
    assert cm.estimate("load", first) == 1.0
    # another model: the same method's compression and the same task's evaluation, learned elsewhere
    opt_mag = by[("tiny-opt", "magnitude")]
    assert cm.estimate("compress", opt_mag) == 8.0
    assert cm.estimate("evaluate", opt_mag) == 2.0
    assert cm.group_seconds([opt_mag]) == pytest.approx(1.0 + 8.0 + 2.0)
    assert cm.group_seconds([opt_mag], done={f"load:{opt_mag.run_id}", f"compress:{opt_mag.run_id}"}) == \
        pytest.approx(2.0)
    # a method no finished cell ran borrows any compression's cost, and `status` says so
    fresh = CostModel()
    fresh.add("compress", first, 0.0)
    assert fresh.knows_method(by[("tiny-opt", "baseline")]) and not fresh.knows_method(opt_mag)
    rows = suite_state(quiet_store(tmp_path / "empty"), cells)
    eta = remaining_seconds(cells, rows, fresh)
    assert eta.unseen_methods == ["magnitude"]
    assert "no finished cell has run magnitude yet" in format_status(rows, eta)
    # from stored records alone (what `status` has): the module's finished run
    store = quiet_store(swept[0] / "seq")
    learned = CostModel.from_records(store.history())
    assert learned.estimate("evaluate", cells[5]) > 0 and learned.seen["load"]


def test_a_method_can_raise_the_request(tmp_path, monkeypatch):
    from dataclasses import replace

    from slimbench.registry import METHODS
    from slimbench.sweep.executors.resources import Machine, group_resources

    cells = load_suite(suite_file(tmp_path, QUALITY)).cells()
    mag = [c for c in cells if c.method.name == "magnitude"]
    base = [c for c in cells if c.method.name == "baseline"]
    monkeypatch.setitem(METHODS.entries, "magnitude", replace(METHODS.get("magnitude"), resources={"memory_gb": 1e6}))
    assert group_resources(mag).memory_bytes == int(1e15)
    assert group_resources(base).memory_bytes == 0  # the suite's hardware asks for none
    assert "or its method" in Machine.this().refusal(group_resources(mag))
