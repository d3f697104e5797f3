"""Speed and memory numbers a reader can trust: the machine lock (visible, bounded, avoidable for
quality-only work), timed cells interleaved, memory from a clean start, one ETA model, bars that
read right, counts that add up, records that carry what a report needs, one line without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scale_helpers import stamp_tasks_fixture  # noqa: F401 - the stamp_tasks fixture

from slimbench.cli import main
from slimbench.sweep.driver import run_cells
from slimbench.sweep.executors.node_lock import LockTimeout, NodeLock, waiting_cells
from slimbench.sweep.runner import RunOptions, units_of
from slimbench.sweep.status import CostModel, ProgressFile, eta_seconds, live_eta, suite_state
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent

# The other run's process: it loads node_lock.py by its path (stdlib and psutil only), not
# through its package, whose executors import torch: seconds of CPU per holder for nothing.
HOLDER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("node_lock", {module!r})
node_lock = sys.modules["node_lock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(node_lock)
lock = node_lock.NodeLock(Path({path!r}))
lock.acquire(exclusive=True, who={{"suite": "other.yaml", "cell": "smollm2-135m | rtn(4-bit) | efficiency@3",
                                   "run_ids": ["x"]}})
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def lock_path(tmp_path, monkeypatch):
    path = tmp_path / "lock" / "node.lock"
    monkeypatch.setenv("SLIMBENCH_NODE_LOCK", str(path))
    return path


@pytest.fixture
def held_lock(lock_path):
    """Another process holds the machine lock exclusively (a timed cell of another run)."""
    module = ROOT / "slimbench" / "sweep" / "executors" / "node_lock.py"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(module=str(module), path=str(lock_path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def quiet(path) -> ResultStore:
    return ResultStore(path, warn=lambda m: None)


def suite_file(tmp_path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


EFF = "{name: efficiency, prompt_len: 8, new_tokens: 3, repeats: 3, warmup: 0, max_repeats: 3, roofline: false}"
TWO_METHODS = f"""
models: [tiny-llama]
methods: [baseline, {{name: magnitude, sparsity: 0.5}}]
tasks: [{{name: perplexity, seqlen: 32, max_windows: 2}}, {EFF}]
hardware: {{threads: 1}}
"""


# -- the machine lock ------------------------------------------------------------------------------
def test_a_waiter_says_on_whom_it_waits_and_gives_up_after_its_timeout(held_lock, lock_path):
    lock = NodeLock(lock_path)
    try:
        t0 = time.monotonic()
        seen = []
        with pytest.raises(LockTimeout) as err:
            for info in lock.wait(exclusive=False, who={"suite": "mine.yaml", "cell": "c", "run_ids": ["r1"]},
                                  timeout=1.5):
                seen.append(info["text"])
                # others see this process waiting, for which cell
                assert waiting_cells(lock_path)["r1"][0].pid == os.getpid()
        assert 1.5 <= time.monotonic() - t0 < 10
        holder = f"PID {held_lock.pid} (other.yaml, smollm2-135m | rtn(4-bit) | efficiency@3; exclusive) since"
        assert seen and all(f"waiting for the machine lock held by {holder}" in s for s in seen)
        assert holder in str(err.value) and "--lock-timeout 1.5 s" in str(err.value)
        assert "r1" not in waiting_cells(lock_path)  # gone from the registry when it gave up
    finally:
        lock.close()


def test_lock_timeout_fails_the_waiting_cells_with_the_holder_named(held_lock, lock_path, tmp_path):
    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()
    store = quiet(tmp_path / "r")
    summary = run_cells(cells[:1], store, show_progress=False, log=lambda s: None,
                        options=RunOptions(lock_timeout=0.5))
    assert summary.failed and not summary.ok
    (rec,) = store.records(include_failed=True)
    assert rec["error"]["type"] == "LockTimeout" and rec["error"]["stage"] == "lock"
    assert f"PID {held_lock.pid}" in rec["error"]["message"]


def test_a_run_waits_its_lock_timeout_once_not_once_per_stage(held_lock, lock_path, tmp_path):
    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()  # two groups: four stages would wait
    store = quiet(tmp_path / "r")
    summary = run_cells(cells, store, show_progress=False, log=lambda s: None, options=RunOptions(lock_timeout=0.5))
    assert len(summary.failed) == 4 and not summary.ok
    messages = [r["error"]["message"] for r in store.records(include_failed=True)]
    waited = [m for m in messages if "not free within --lock-timeout 0.5 s" in m]
    tried = [m for m in messages if "already waited its --lock-timeout" in m]
    assert len(waited) == 2 and len(tried) == 2, messages  # the first group's two cells waited; the rest tried
    assert all(f"PID {held_lock.pid}" in m for m in messages)


def test_waiting_for_the_lock_is_not_progress_in_the_eta(tmp_path):
    from types import SimpleNamespace

    from slimbench.sweep.driver import Sweep, _Running

    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()
    sweep = Sweep(cells, quiet(tmp_path / "r"), SimpleNamespace(slots=1), suite_source="", show_progress=False,
                  log=lambda s: None, claim_timeout=60)
    sweep.running[0] = _Running(cells, None, "")
    full = sweep.eta()
    sweep.running[0].last_event -= 30  # 30 s of waiting for the machine lock...
    sweep.handle(0, ("waiting", {"text": "waiting for the machine lock held by PID 1", "run_ids": []}))
    assert sweep.eta() == pytest.approx(full, abs=1.0)  # ...bring the end no closer
    assert "waiting for the machine lock held by PID 1" in sweep.postfix()
    sweep.running[0].last_event -= 30  # 30 s of work do
    sweep.handle(0, ("progress", {}))
    assert sweep.eta() <= full - 29


def test_a_timed_cells_cost_is_never_borrowed_from_quality_cells(tmp_path):
    from slimbench.sweep.status import DEFAULTS

    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()
    ppl = [c for c in cells if c.task.name == "perplexity"]
    eff = [c for c in cells if c.task.name == "efficiency"]
    cm = CostModel()
    cm.add("evaluate", ppl[0], 2.0)
    assert cm.unit_seconds([eff[1]], done={f"load:{eff[1].run_id}", f"compress:{eff[1].run_id}"}) == \
        (0.0, DEFAULTS["timed"])  # not the 2 s of a perplexity cell
    cm.add("evaluate", eff[0], 40.0)  # the same timed task, another method: learned from it
    assert cm.estimate("evaluate", eff[1], timed=True) == 40.0


# A run of one cell of a test model and task (tests/scale_helpers.py): what waits for the lock is
# the run, whatever its cells; the run is another process, as a user's second run would be.
WAITING = """
models: [stamp-a]
methods: [baseline]
tasks: [{name: stamp, log: %s, sleep: 0}]
hardware: {threads: 1}
"""


def test_status_and_the_bar_say_a_cell_waits_for_the_lock_and_on_whom(held_lock, lock_path, tmp_path, stamp_tasks):
    suite = suite_file(tmp_path, WAITING % (tmp_path / "log.jsonl"))
    results = tmp_path / "r"
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; import scale_register; "
            f"from slimbench.cli import main; "
            f"sys.exit(main(['run', {str(suite)!r}, '--results', {str(results)!r}, '--no-report']))")
    env = {**os.environ, "SLIMBENCH_NODE_LOCK": str(lock_path)}
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 300
        rows = []
        while time.monotonic() < deadline:
            rows = [r for r in suite_state(quiet(results), load_suite(suite).cells()) if r.state == "waiting"]
            if rows:
                break
            time.sleep(0.5)
        assert rows, "no cell was ever shown waiting"
        assert f"waiting for the machine lock held by PID {held_lock.pid} (other.yaml" in rows[0].detail
        held_lock.kill()  # the other run's timed cell ends: ours go on
        _, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert f"waiting for the machine lock held by PID {held_lock.pid}" in err  # on the progress bar


def test_quality_only_runs_untimed_cells_without_waiting(held_lock, tmp_path, capsys, stamp_tasks):
    log = tmp_path / "log.jsonl"
    suite = suite_file(tmp_path, f"""
    models: [stamp-a]
    methods: [baseline, {{name: magnitude, sparsity: 0.5}}]
    tasks: [{{name: stamp, log: {log}, sleep: 0}}, {{name: stamp_timed, log: {log}}}]
    hardware: {{threads: 1}}
    """)
    t0 = time.monotonic()
    assert main(["run", str(suite), "--results", str(tmp_path / "r"), "--quality-only", "--no-report",
                 "--no-progress", "--lock-timeout", "600"]) == 0
    assert time.monotonic() - t0 < 300  # the other run's lock (held for 600 s) was never waited for
    assert "2 timed cell(s) left out" in capsys.readouterr().out
    assert {r["task"]["name"] for r in quiet(tmp_path / "r").records()} == {"stamp"}


# -- interleaving ------------------------------------------------------------------------------------
def test_timed_cells_of_one_model_alternate_their_repeats(tmp_path, lock_path, monkeypatch):
    from slimbench.tasks.efficiency import EfficiencyRun

    monkeypatch.setenv("SLIMBENCH_MEMORY_PROBE", "off")  # memory is another test's
    order = []
    sample = EfficiencyRun.sample

    def logged(self):
        order.append(self.ctx.method_report["steps"][0]["name"])
        sample(self)

    monkeypatch.setattr(EfficiencyRun, "sample", logged)
    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()
    assert len(units_of(cells)) == 1 and len(units_of(cells, interleave=False)) == 2
    store = quiet(tmp_path / "r")
    assert len(run_cells(cells, store, show_progress=False, log=lambda s: None).ok) == 4
    assert order == ["baseline", "magnitude", "magnitude", "baseline", "baseline", "magnitude"]  # A B, B A, A B
    recs = {r["method"]["name"]: r for r in store.records() if r["task"]["name"] == "efficiency"}
    info = recs["baseline"]["task_details"]["interleaving"]
    assert info["interleaved"] and info["with"] == [recs["magnitude"]["run_id"]] and info["rounds"] == 3
    assert info["labels"] == ["magnitude(50% sparse)"]
    # kept apart: each record says it was measured alone, and why
    store2 = quiet(tmp_path / "r2")
    run_cells(cells, store2, show_progress=False, log=lambda s: None, options=RunOptions(interleave=False))
    for r in store2.records():
        if r["task"]["name"] == "efficiency":
            got = r["task_details"]["interleaving"]
            assert got["interleaved"] is False and "--no-interleave" in got["reason"]


# -- memory from a clean start -----------------------------------------------------------------------
LEAK: list = []


def test_the_same_cell_gives_the_same_peak_memory_whatever_the_process_held(tmp_path, lock_path, monkeypatch):
    import torch

    from slimbench.measure import memory

    monkeypatch.setenv("SLIMBENCH_ARTIFACTS", str(tmp_path / "artifacts"))  # reloadable in a fresh process
    monkeypatch.setenv("SLIMBENCH_MEMORY_PROBE", "on")  # the suite turns it off elsewhere (tests/conftest.py)
    text = f"""
    models: [tiny-llama]
    methods: [{{name: rtn, bits: 8, group_size: 32}}]
    tasks: [{EFF}]
    hardware: {{threads: 1}}
    """
    cells = load_suite(suite_file(tmp_path, text)).cells()
    peaks = {}
    for name, leak_mb in (("clean", 0), ("leaky", 300)):
        LEAK[:] = [torch.ones(leak_mb * 2**20 // 4)] if leak_mb else []  # what compression left behind, say
        store = quiet(tmp_path / name)
        assert run_cells(cells, store, show_progress=False, log=lambda s: None).ok
        (rec,) = store.records()
        proto = rec["task_details"]["memory_protocol"]
        assert proto["isolation"] == "fresh process" and proto["clean"], proto
        assert proto["loaded"] == "reloaded from the artifact cache" or name == "clean"
        peaks[name] = rec["metrics"]["peak_memory_mb"]["value"]
    LEAK.clear()
    tol = memory.tolerance(0, 0) / 2**20  # 32 MiB: the tolerance the docs state
    assert abs(peaks["clean"] - peaks["leaky"]) <= tol, peaks


# -- progress ---------------------------------------------------------------------------------------
def test_eta_is_per_worker_and_timed_work_holds_the_machine():
    # two workers busy for 10 s and 2 s; two queued units of 5 s: the second worker takes both (2 + 5 + 5)
    assert eta_seconds([(10, 0), (2, 0)], [(5, 0), (5, 0)], workers=2) == 12
    assert eta_seconds([], [(5, 0), (5, 0)], workers=1) == 10
    assert eta_seconds([], [(5, 3), (5, 4)], workers=2) == 5 + 7  # timed blocks one after another


def test_status_shows_the_running_bars_own_eta(tmp_path):
    store = quiet(tmp_path)
    pf = ProgressFile(store)
    pf.write(eta=600.0, workers=2, waiting={}, cells_left=3)
    eta = live_eta(tmp_path)
    assert eta is not None and 590 <= eta.seconds <= 600 and eta.workers == 2 and "progress bar" in eta.source
    pf.remove()
    assert live_eta(tmp_path) is None


def test_the_bar_reads_right_and_efficiency_has_its_own(tmp_path, lock_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMBENCH_MEMORY_PROBE", "off")
    text = f"""
    models: [tiny-llama]
    methods: [baseline]
    tasks: [{EFF.replace("repeats: 3, warmup: 0, max_repeats: 3", "repeats: 2, warmup: 1, max_repeats: 2")}]
    hardware: {{threads: 1}}
    """
    cells = load_suite(suite_file(tmp_path, text)).cells()
    from slimbench.registry import TASKS
    from slimbench.task import TaskContext

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.total, self.n = kw, kw.get("total"), 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            pass

    from slimbench.sweep.cellrun import load_model

    lm = load_model(cells[0])
    task = TASKS.get("efficiency")
    task.evaluate(lm, task.config(**cells[0].task.params), TaskContext(cells[0].hardware, {}, progress=Bar))
    assert bars and bars[0].kw["desc"] == "efficiency" and bars[0].n == bars[0].total == 3  # 1 warm-up + 2 timed
    run_cells(cells, quiet(tmp_path / "r"), show_progress=True, log=lambda s: None)
    err = capsys.readouterr().err
    assert "cells: 100%" in err and ", ," not in err and "[00:" in err


def test_counts_say_what_was_compressed_built_or_unchanged():
    from slimbench.sweep.artifacts.counts import run_counts

    def rec(name, families, steps, art):
        return {"started_at": "2030", "model": {"name": "m"}, "hardware": {}, "method": {
            "name": name, "steps": [{"name": s} for s, _ in steps], "families": families},
            "method_report": {"artifact": art, "compress_seconds": sum(x for _, x in steps) + 130,
                              "steps": [{"name": s, "seconds": x} for s, x in steps]}}

    off = {"reused": False, "saved": False, "reason": "the artifact cache is off"}
    records = [rec("baseline", ["baseline"], [("baseline", 0.01)], off),
               rec("wanda", ["pruning"], [("wanda", 7.7)], off),
               rec("wanda", ["pruning"], [("wanda", 7.7)], off),  # a second task of the same group
               rec("compile", ["acceleration"], [("compile", 140.0)], off)]
    counts = run_counts(records, "2020")
    assert (counts["compressed"], counts["unchanged"], counts["built"]) == (1, 1, 1)
    assert counts["compress_seconds"] == pytest.approx(7.7) and counts["build_seconds"] == pytest.approx(140.0)


# -- records -----------------------------------------------------------------------------------------
def test_a_record_carries_its_method_family_and_task_roles(tmp_path, lock_path):
    text = """
    models: [tiny-llama]
    methods: [[{name: magnitude, sparsity: 0.5}, {name: rtn, bits: 8, group_size: 32}]]
    tasks: [{name: perplexity, seqlen: 32, max_windows: 2}]
    hardware: {threads: 1}
    """
    store = quiet(tmp_path / "r")
    run_cells(load_suite(suite_file(tmp_path, text)).cells(), store, show_progress=False, log=lambda s: None)
    (rec,) = store.records()
    assert rec["method"]["families"] == ["pruning", "quantization"]
    assert rec["method"]["family"] == "pruning+quantization"
    assert rec["task_info"]["quality_metric"] == "perplexity" and rec["task_info"]["timed"] is False
    from slimbench.devtools.verify import cell_of

    assert cell_of(rec).run_id == rec["run_id"]  # still the spec it was run from


NO_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # as if torch were not installed
sys.argv = ["benchmark.py", *sys.argv[1:]]
runpy.run_path({bench!r}, run_name="__main__")
"""


@pytest.mark.parametrize("argv", [["--help"], ["list", "methods"], ["run", "tiny"], ["status"]])
def test_without_torch_every_command_says_what_to_install(argv):
    code = NO_TORCH.format(bench=str(ROOT / "benchmark.py"))
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the Python package 'torch'" in lines[0] and "pip install" in lines[0]


def test_status_says_which_claimed_cells_run_and_which_are_queued(tmp_path):
    from slimbench.sweep.cell_claims import ClaimBook
    from slimbench.sweep.status import format_status

    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()
    store = quiet(tmp_path / "r")
    book = ClaimBook(store)  # this process plays a live run that claimed the whole unit
    for c in cells:
        book.try_claim(c.run_id)
    try:
        assert {r.state for r in suite_state(store, cells)} == {"running"}  # no progress file: as claimed
        pf = ProgressFile(store)
        pf.write(eta=60.0, workers=1, waiting={}, cells_left=4, active=[cells[0].run_id])
        rows = suite_state(store, cells)
        assert [r.state for r in rows] == ["running", "queued", "queued", "queued"]
        assert "next in run" in rows[1].detail
        assert "4 cells: 0 done, 1 running, 3 queued, 0 pending" in format_status(rows, None)
        pf.remove()
    finally:
        book.release_all()


def test_the_driver_publishes_the_cells_its_stage_works_on(tmp_path, lock_path, monkeypatch):
    from slimbench.sweep.driver import Sweep
    from slimbench.sweep.executors import LocalExecutor

    monkeypatch.setenv("SLIMBENCH_MEMORY_PROBE", "off")
    cells = load_suite(suite_file(tmp_path, TWO_METHODS)).cells()
    sweep = Sweep(cells, quiet(tmp_path / "r"), LocalExecutor(), suite_source="", show_progress=False,
                  log=lambda s: None, claim_timeout=60)
    seen = []
    original = sweep.handle

    def handle(gid, event):
        original(gid, event)
        if event[0] == "begin":  # what `status` reads at that moment
            sweep.publish()
            seen.append(json.loads(sweep.progress_file.path.read_text())["active"])

    sweep.handle = handle
    sweep.run()
    groups = [[c.run_id for c in cells if c.method.name == m] for m in ("baseline", "magnitude")]
    ppl = [c.run_id for c in cells if c.task.name == "perplexity"]
    eff = sorted(c.run_id for c in cells if c.task.name == "efficiency")
    assert seen == [sorted(groups[0]), [ppl[0]], sorted(groups[1]), [ppl[1]], eff]


def test_progress_file_is_json_the_status_command_can_read(tmp_path):
    pf = ProgressFile(quiet(tmp_path))
    pf.write(eta=None, workers=1, waiting={"r": "waiting for the machine lock"}, cells_left=1)
    assert json.loads(pf.path.read_text())["waiting"] == {"r": "waiting for the machine lock"}
    assert CostModel().unit_seconds([]) == (0.0, 0.0)
