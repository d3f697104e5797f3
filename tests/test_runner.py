"""The sweep: a record per cell, failures become records, reruns skip finished cells."""

import json
import os
import shutil

import pytest
from scale_helpers import read_log, stamp_tasks_fixture  # noqa: F401 - the stamp_tasks fixture

from slimbench.config import Config
from slimbench.registry import TASKS
from slimbench.report.write import write_report
from slimbench.sweep.driver import run_cells
from slimbench.sweep.executors import LocalExecutor
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite
from slimbench.task import Task

SUITE = """
models: [tiny-llama]
methods:
  - baseline
  - {name: rtn, bits: 4, group_size: 32}
  - {name: rtn, bits: 4, group_size: 128}   # 128 does not divide the 64-wide layers: fails at check
  - {name: magnitude, sparsity: 0.5}
tasks:
  - {name: perplexity, seqlen: 64, max_windows: 3}
  - {name: efficiency, prompt_len: 8, new_tokens: 2, repeats: 2, warmup: 0, max_repeats: 2, roofline: false}
  - boom
hardware: {threads: 1}
"""


class BoomConfig(Config):
    pass


def boom(lm, cfg, ctx):
    raise RuntimeError("task exploded")


BOOM = Task("boom", "1", "always fails", BoomConfig, boom)


@pytest.fixture
def boom_task(monkeypatch):
    monkeypatch.setitem(TASKS.entries, "boom", BOOM)


# The tests that read the module's sweep stay on one test worker (make test runs pytest-xdist
# with --dist loadgroup): spread over two, each worker would run the sweep again.
SHARES_THE_SWEEP = pytest.mark.xdist_group("test_runner-swept")


@pytest.fixture(scope="module")
def swept_once(tmp_path_factory):
    """The sweep, run once for the module (tests get a copy of its results folder)."""
    tmp = tmp_path_factory.mktemp("swept")
    path = tmp / "suite.yaml"
    path.write_text(SUITE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS.entries, "boom", BOOM)
        suite = load_suite(path, check_models=False)  # the g128 cell must reach the runner, which fails it at check
        summary = run_cells(suite.cells(), ResultStore(tmp / "results"), suite_source=str(path),
                            show_progress=False, log=lambda s: None)
    return suite, tmp / "results", summary


@pytest.fixture
def swept(swept_once, tmp_path, boom_task):
    suite, results, summary = swept_once
    shutil.copytree(results, tmp_path / "results")
    return suite, ResultStore(tmp_path / "results"), summary


@SHARES_THE_SWEEP
def test_every_cell_has_a_record(swept):
    suite, store, summary = swept
    cells = suite.cells()
    assert len(cells) == 12
    # rtn g128: its 3 cells fail at compress; the boom task fails on the 3 other methods
    assert len(summary.ok) == 6 and len(summary.failed) == 6
    recs = {r["run_id"]: r for r in store.records(include_failed=True)}
    assert set(recs) == {c.run_id for c in cells}
    stages = sorted((r["error"] or {}).get("stage", "") for r in recs.values() if r["status"] == "failed")
    assert stages == ["compress"] * 3 + ["evaluate"] * 3
    failed_compress = next(r for r in recs.values() if (r["error"] or {}).get("stage") == "compress")
    assert "does not divide" in failed_compress["error"]["message"]


@SHARES_THE_SWEEP
def test_record_schema(swept):
    _, store, _ = swept
    rec = next(r for r in store.records() if r["method"]["name"] == "rtn" and r["task"]["name"] == "perplexity")
    for key in (
        "run_id",
        "status",
        "model",
        "method",
        "task",
        "hardware",
        "metrics",
        "method_report",
        "environment",
        "started_at",
        "finished_at",
    ):
        assert key in rec
    assert rec["task"]["version"] == "concat-windows/1"
    assert rec["metrics"]["perplexity"]["higher_is_better"] is False
    assert rec["method_report"]["execution"] == "simulated"
    assert rec["method_report"]["effective_bits"] == pytest.approx(4.625)
    env = rec["environment"]
    assert {"python", "torch", "transformers", "cpu", "git"} <= set(env)
    assert rec["model"]["provenance"]["weights"] == "random"


@SHARES_THE_SWEEP
def test_rerun_skips_ok_cells_and_keeps_failures(swept, tmp_path):
    suite, store, _ = swept
    before = {p.name: p.read_text() for p in store.runs.glob("*.json")}
    again = run_cells(suite.cells(), store, show_progress=False, log=lambda s: None)
    assert len(again.skipped) == 6 and not again.ok
    after = {p.name: p.read_text() for p in store.runs.glob("*.json")}
    assert all(after[name] == text for name, text in before.items())  # nothing overwritten
    assert len(after) == len(before) + 6  # the failed cells were retried, each a new record


def fake_record(run_id="abc", status="ok", **extra):
    """The fields that make a dict a record (the store skips anything less)."""
    return {
        "run_id": run_id,
        "status": status,
        "model": {"name": "m"},
        "method": {"name": "baseline", "label": "baseline"},
        "task": {"name": "t", "version": "1", "params": {}},
        "hardware": {},
        "metrics": {},
        **extra,
    }


def test_store_never_overwrites(tmp_path):
    store = ResultStore(tmp_path)
    rec = fake_record(x=1)
    store.write(rec)
    with pytest.raises(FileExistsError):
        store.write({**rec, "x": 2})
    assert json.loads(store.ok_path("abc").read_text())["x"] == 1
    assert not [p for p in store.runs.iterdir() if p.name.startswith(".")]  # no temp files left


@SHARES_THE_SWEEP
def test_report_from_sweep(swept, tmp_path):
    _, store, _ = swept
    out = write_report(store, tmp_path / "report")
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    csv = (tmp_path / "report" / "leaderboard.csv").read_text()
    ppl = {
        r["method"]["label"]: r["metrics"]["perplexity"]["value"]
        for r in store.records()
        if r["task"]["name"] == "perplexity"
    }
    import pandas as pd

    df = pd.read_csv(tmp_path / "report" / "leaderboard.csv")
    col = "perplexity@concat-windows/1"
    for _, row in df.iterrows():
        assert row[col] == pytest.approx(ppl[row["method"]])
        assert row[f"Δ {col}"] == pytest.approx(ppl[row["method"]] - ppl["baseline"])
    assert "simulated" in md and "Failed cells" in md and "task exploded" in md
    pngs = [f for f in out.files if f.suffix == ".png"]
    assert len(pngs) == 4  # quality vs size, decode latency, prefill latency, memory
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "rtn(4-bit, g32)" in csv  # key settings shown even at their default
    # per-window NLLs pair each method with the baseline: a paired interval for every non-baseline row
    noise = df.set_index("method")[f"noise {col} (paired Δ nll, nats/token, 95% CI)"].fillna("")
    assert noise["baseline"] == "" and all("95% CI" in noise[m] for m in noise.index if m != "baseline")


# A test model and task (tests/scale_helpers.py): the fresh process per group is what is tested,
# and it need not import a transformers model to show it writes the record.
ISOLATED = """
models: [stamp-a]
methods: [baseline]
tasks: [{{name: stamp, log: {log}, sleep: 0, value: 2.5}}]
hardware: {{threads: 1}}
"""


def test_isolated_group_and_timeout(tmp_path, stamp_tasks):
    path = tmp_path / "suite.yaml"
    path.write_text(ISOLATED.format(log=tmp_path / "log.jsonl"))
    cells = load_suite(path).cells()
    # a timeout far too short for a fresh process even to import torch: a failed record, not a hang
    store = ResultStore(tmp_path / "cut")
    summary = run_cells(cells, store, show_progress=False, isolate=True, timeout=0.5, log=lambda s: None)
    (rec,) = store.records(include_failed=True)
    assert summary.failed == [cells[0].run_id]
    assert rec["status"] == "failed" and rec["error"]["type"] == "Timeout"
    # without a timeout the worker process writes the ok record itself
    store = ResultStore(tmp_path / "ok")
    # what isolate=True builds, with the test model and task registered in the worker
    executor = LocalExecutor(1, isolate=True, preload=("scale_register",))
    summary = run_cells(cells, store, executor=executor, show_progress=False, log=lambda s: None)
    assert summary.ok == [cells[0].run_id]
    assert store.records()[0]["metrics"]["score"]["value"] == 2.5
    (line,) = read_log(tmp_path / "log.jsonl")
    assert line["pid"] != os.getpid()  # computed in the worker process


def test_memory_held_by_an_engine_process_counts_toward_the_interleaving_limit():
    """An engine step keeps its model in a child process; the block must see that memory, or a
    suite of engine groups holds every engine alive until the machine runs out."""
    import subprocess
    import sys

    from slimbench.sweep.runner import held_rss, memory_is_short

    mine = held_rss()
    limit = 2 * (mine + 150 * 2**20)  # half of it: this process and 150 MiB more
    assert not memory_is_short(limit) and not memory_is_short(None)
    child = subprocess.Popen([sys.executable, "-c", "b = b'x' * (300 * 2**20); print('ready', flush=True); input()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert held_rss() > mine + 250 * 2**20
        assert memory_is_short(limit)
    finally:
        child.kill()
        child.wait()
