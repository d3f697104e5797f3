"""The results store as a user (and a hostile folder) meets it: strict JSON, broken and
foreign files, latest state vs history, the results folder checked before any cell."""

import json
import subprocess
import sys

import pytest
import torch
from scale_helpers import stamp_tasks_fixture  # noqa: F401 - the stamp_tasks fixture
from test_runner import fake_record

from slimbench.cli import main
from slimbench.errors import SuiteError
from slimbench.report.write import write_report
from slimbench.sweep.driver import run_cells
from slimbench.sweep.store import ResultStore, check_results_folder, comparable_record
from slimbench.sweep.suite import load_suite

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def strict_load(text: str):
    """json.loads that rejects NaN/Infinity, as strict JSON readers do."""

    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


# the stamp task on a test model (tests/scale_helpers.py): what is tested is the record and the
# store, whatever model wrote it
STAMP = """
models: [stamp-a]
methods: [baseline]
tasks:
  - {{name: stamp, log: {log}, sleep: 0, value: {value}}}
hardware: {{threads: 1}}
"""


def run_stamp(tmp_path, value, results="results"):
    suite = tmp_path / "suite.yaml"
    suite.write_text(STAMP.format(log=tmp_path / "log.jsonl", value=value))
    store = ResultStore(tmp_path / results, warn=lambda m: None)
    summary = run_cells(load_suite(suite).cells(), store, show_progress=False, log=lambda s: None)
    return store, summary


@pytest.mark.parametrize("value, word", [("null", "NaN"), (".inf", "inf"), ("-.inf", "-inf")])
def test_non_finite_quality_metric_fails_the_cell(tmp_path, stamp_tasks, value, word):
    store, summary = run_stamp(tmp_path, value)
    assert not summary.ok and len(summary.failed) == 1
    (path,) = store.runs.glob("*.json")
    rec = strict_load(path.read_text())  # a strict reader accepts the file
    assert rec["status"] == "failed"
    assert rec["error"]["message"] == f"score is {word}: the model produces non-finite logits"
    assert rec["metrics"]["score"]["value"] is None
    assert "metrics.score.value" in rec["non_finite_replaced"]
    assert not store.records()  # never ranked as ok


def test_records_are_strict_json_whatever_they_hold(tmp_path):
    store = ResultStore(tmp_path)
    rec = fake_record(task_details={"per_example": [1.0, float("nan"), float("-inf")]}, x={"y": float("inf")})
    path = store.write(rec)
    back = strict_load(path.read_text())
    assert back["task_details"]["per_example"] == [1.0, None, None]
    assert back["non_finite_replaced"] == ["task_details.per_example[1]", "task_details.per_example[2]", "x.y"]


def test_broken_and_foreign_files_are_skipped_once_and_recomputed(tmp_path, stamp_tasks):
    store, _ = run_stamp(tmp_path, 1.0)
    (ok,) = store.runs.glob("*.json")
    run_id = ok.stem
    ok.write_text(ok.read_text()[:200])  # truncated, as by a full disk
    (store.runs / "list.json").write_text("[1, 2]")
    (store.runs / "object.json").write_text('{"hello": "world"}')
    (store.runs / "binary.json").write_bytes(b"\xff\xfe\x00")
    warnings = []
    store = ResultStore(tmp_path / "results", warn=warnings.append)
    assert not store.has_ok(run_id) and store.records(include_failed=True) == []
    store.records()
    store.history()
    assert sorted(p.name for p, _ in store.problems) == sorted(
        ["binary.json", "list.json", "object.json", f"{run_id}.json"]
    )
    assert len(warnings) == 4 and all(str(store.runs) in w for w in warnings)  # one each, naming the file
    reasons = dict((p.name, r) for p, r in store.problems)
    assert "truncated" in reasons[f"{run_id}.json"] and "list" in reasons["list.json"]
    write_report(store, tmp_path / "report")  # the report neither crashes nor counts them
    # run computes the cell again; the broken file is moved aside, not overwritten or counted
    summary = run_cells(load_suite(tmp_path / "suite.yaml").cells(), store, show_progress=False, log=lambda s: None)
    assert len(summary.ok) == 1 and not summary.skipped
    assert strict_load(ok.read_text())["status"] == "ok"
    assert len(list(store.runs.glob(f"{run_id}.json.corrupt-*"))) == 1


def test_latest_state_per_cell_and_full_history(tmp_path):
    store = ResultStore(tmp_path)
    store.write(fake_record("a", "failed", finished_at="2026-01-01T00:00:01.000000Z", error={"message": "first"}))
    store.write(fake_record("a", "ok", finished_at="2026-01-01T00:00:03.000000Z"))
    store.write(fake_record("b", "failed", finished_at="2026-01-01T00:00:02.000000Z", error={"message": "old"}))
    store.write(fake_record("b", "failed", finished_at="2026-01-01T00:00:04.000000Z", error={"message": "new"}))
    latest = store.records(include_failed=True)
    assert [(r["run_id"], r["status"]) for r in latest] == [("a", "ok"), ("b", "failed")]
    assert latest[1]["error"]["message"] == "new"
    assert [r["run_id"] for r in store.records()] == ["a"]
    assert len(store.history()) == 4 and store.problems == []


def test_environment_describes_the_cell_as_it_ran(tmp_path, stamp_tasks):
    torch.set_num_threads(2)  # the process default differs from the cell's threads: 1
    try:
        store, _ = run_stamp(tmp_path, 1.0)
    finally:
        torch.set_num_threads(1)
    (rec,) = store.history()
    assert rec["task_details"]["threads"] == 1  # what the task saw
    assert rec["environment"]["torch_threads"] == 1


def test_comparable_record_drops_only_what_varies():
    rec = fake_record(
        metrics={"ppl": {"value": 3.0, "unit": "ppl"}, "lat": {"value": 2.0, "unit": "ms"}},
        started_at="x",
        timings={"load_seconds": 1},
        method_report={"compress_seconds": 1.0, "effective_bits": 4, "steps": [{"name": "rtn", "seconds": 2}]},
    )
    c = comparable_record(rec)
    assert c["metrics"] == {"ppl": {"value": 3.0, "unit": "ppl"}}
    assert c["method_report"] == {"effective_bits": 4, "steps": [{"name": "rtn"}]}
    assert "started_at" not in c and "timings" not in c and c["run_id"] == "abc"


# -- the results folder and the options, checked before any cell --------------------------------
TINY = """
models: [tiny-gpt2]
methods: [baseline]
tasks: [{name: perplexity, seqlen: 16, max_windows: 1}]
hardware: {threads: 1}
"""


@pytest.fixture
def tiny_suite(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def test_results_pointing_at_a_file_fails_before_any_cell(tmp_path, tiny_suite, capsys):
    target = tmp_path / "afile"
    target.write_text("not a folder")
    assert main(["run", tiny_suite, "--results", str(target), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "not a folder"
    with pytest.raises(SuiteError, match="is a file"):
        check_results_folder(target)


def test_unwritable_results_folder_fails_before_any_cell(tmp_path, tiny_suite, capsys):
    # /proc cannot hold folders, whoever we are (root ignores permission bits)
    assert main(["run", tiny_suite, "--results", "/proc/slimbench-results", "--no-progress"]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_read_only_mount_fails_before_any_cell(tmp_path, tiny_suite):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --mount` (root) to make a read-only mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (
        f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
        f"{sys.executable} {ROOT / 'benchmark.py'} run {tiny_suite} --results {ro}/results --no-progress"
    )
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "cannot write there" in out.stderr and "Read-only file system" in out.stderr
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--timeout", "0", "must be positive"),
        ("--timeout", "-5", "must be positive"),
        ("--workers", "0", "must be positive"),
        ("--workers", "two", "expected a number of processes"),
        ("--memory-limit", "-1", "must be positive"),
    ],
)
def test_non_positive_options_are_refused(tmp_path, tiny_suite, capsys, option, value, words):
    with pytest.raises(SystemExit) as exc:
        main(["run", tiny_suite, "--results", str(tmp_path / "r"), option, value])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unmeetable_request_is_refused_before_any_cell(tmp_path, tiny_suite, capsys):
    args = ["run", tiny_suite, "--results", str(tmp_path / "r"), "--no-progress"]
    assert main([*args, "--set", "hardware.threads=512"]) == 2
    assert "asks for 512 CPUs" in capsys.readouterr().err
    assert main([*args, "--set", "hardware.memory_gb=1000000"]) == 2
    assert "hardware.memory_gb" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unreachable_ray_address_is_refused_before_any_cell(tmp_path, tiny_suite, capsys):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -r requirements-ray.txt)")
    args = ["run", tiny_suite, "--results", str(tmp_path / "r"), "--no-progress", "--executor", "ray"]
    assert main([*args, "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach a Ray cluster" in err and "127.0.0.1:1" in err
    assert not (tmp_path / "r").exists()
    assert main(["run", tiny_suite, "--address", "127.0.0.1:1"]) == 2  # --address without ray
    assert "use it with --executor ray" in capsys.readouterr().err


def test_written_files_are_shared_like_any_file_the_user_writes(tmp_path):
    """Atomic writes go through a private (0600) temporary file; the result gets the mode any
    file the user creates gets: 0666 less the umask."""
    import os
    import stat

    from slimbench.sweep.store import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_write_text(tmp_path / "b.json", "{}", overwrite=False)
    for name in ("a.json", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt, 130), (BrokenPipeError, 141)])
def test_ctrl_c_is_a_clear_message_not_a_traceback(monkeypatch, capsys, exc, code):
    """Ctrl-C anywhere in a command: exit 130 and say that finished cells are kept; output
    piped into `head`: exit quietly as a shell's SIGPIPE would."""
    import slimbench.cli as cli

    def interrupted(args):
        raise exc

    real = cli.parser

    def parser(prog):
        p = real(prog)
        parse = p.parse_args
        p.parse_args = lambda argv: setattr(ns := parse(argv), "fn", interrupted) or ns
        return p

    monkeypatch.setattr(cli, "parser", parser)
    assert cli.main(["list", "methods"]) == code
    err = capsys.readouterr().err
    assert ("interrupted: finished cells are kept" in err) == (code == 130) and "Traceback" not in err
