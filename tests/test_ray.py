"""The Ray executor on a real local Ray, inside a network namespace that has only loopback.

Ray binds to the machine's network address whatever it is told, so the test never starts it
in the machine's own namespace: a driver process runs under ``unshare --net`` (root), brings
``lo`` up and starts Ray there. The records must equal those of a sequential local run, timed
cells must run alone, and a request no node can meet is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from netns import loopback_namespace_problem
from scale_helpers import read_log, stamp_tasks_fixture  # noqa: F401 - the stamp_tasks fixture

from slimbench.sweep.driver import run_cells
from slimbench.sweep.store import ResultStore, comparable_record
from slimbench.sweep.suite import load_suite

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -r requirements-ray.txt")

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


NETNS_PROBLEM = loopback_namespace_problem()
pytestmark = pytest.mark.skipif(
    NETNS_PROBLEM is not None, reason=f"Ray must not bind to this machine's network address: {NETNS_PROBLEM}"
)

# One real tiny model, two methods: two groups, two Ray tasks at once on the two CPUs, real
# perplexities to compare with the local run. The timed cell and the refused request use a test
# model (tests/scale_helpers.py: two linear layers, no tokenizer), which costs a Ray worker no
# transformers import and no tokenizer build.
QUALITY = """
models: [tiny-llama]
methods:
  - baseline
  - {{name: magnitude, sparsity: 0.5}}
tasks:
  - {{name: stamp, log: {log}, tag: q, sleep: 1.0}}
  - {{name: perplexity, seqlen: 16, max_windows: 2}}
hardware: {{threads: 1}}
"""
TIMED = """
models: [stamp-a]
methods: [baseline]
tasks:
  - {{name: stamp_timed, log: {log}, tag: t, sleep: 0.5}}
hardware: {{threads: 1}}
"""
TOO_BIG = """
models: [stamp-a]
methods: [baseline]
tasks: [{{name: stamp, log: {log}}}]
hardware: {{threads: 64}}
"""

DRIVER = """
import json, sys
import scale_register  # noqa: F401 - the test tasks, here and (through PYTHONPATH) in Ray's workers
from slimbench.errors import SuiteError
from slimbench.sweep.executors.ray_executor import RayExecutor
from slimbench.sweep.driver import sweep
from slimbench.sweep.runner import group_cells
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite

# validated by the test's local run already; unchecked here, the driver imports no transformers model
cells = load_suite({quality!r}, check_models=False).cells() + load_suite({timed!r}).cells()
ex = RayExecutor(preload=("scale_register",))
ex.start()
try:
    ex.check(list(group_cells(load_suite({too_big!r}).cells()).values()))
    print("NOT REFUSED")
except SuiteError as err:
    print("REFUSED", err)
summary = sweep(cells, ResultStore({results!r}), ex, show_progress=False)
print("SUMMARY", json.dumps({{**summary.__dict__, "startup_s": ex.startup_seconds}}))
"""


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).format(log=tmp_path / "log.jsonl"))
    return str(path)


def test_ray_records_equal_local_ones_and_timed_cells_run_alone(tmp_path, stamp_tasks):
    quality, timed = write(tmp_path, "q.yaml", QUALITY), write(tmp_path, "t.yaml", TIMED)
    too_big = write(tmp_path, "big.yaml", TOO_BIG)
    cells = load_suite(quality).cells() + load_suite(timed).cells()
    local = ResultStore(tmp_path / "local")
    assert len(run_cells(cells, local, show_progress=False, log=lambda s: None).ok) == len(cells) == 5
    local_lines = len(read_log(tmp_path / "log.jsonl"))

    code = DRIVER.format(quality=quality, timed=timed, too_big=too_big, results=str(tmp_path / "ray"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "RAY_USAGE_STATS_ENABLED": "0"}
    (tmp_path / "driver.py").write_text(code)
    script = f"ip link set lo up && exec {sys.executable} {tmp_path / 'driver.py'}"
    out = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "asks for 64 CPU(s)" in out.stdout, out.stdout
    summary = json.loads(out.stdout.split("SUMMARY ", 1)[1])
    assert len(summary["ok"]) == 5 and not summary["failed"], out.stderr[-3000:]

    ray_store = ResultStore(tmp_path / "ray")
    a = {r["run_id"]: comparable_record(r) for r in local.records()}
    b = {r["run_id"]: comparable_record(r) for r in ray_store.records()}
    assert a == b

    log = read_log(tmp_path / "log.jsonl")[local_lines:]
    timed_runs = [e for e in log if '"t"]' in e["cell"]]
    others = [e for e in log if e not in timed_runs]
    assert len(timed_runs) == 1 and len(others) == 2
    t = timed_runs[0]
    assert not any(overlaps(t, o) for o in others)
    assert len({e["pid"] for e in others}) == 2  # the two quality groups ran as separate Ray tasks
