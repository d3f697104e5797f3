"""`verify RESULTS [--rerun K]`: a results folder someone sends in is read as data, checked
record by record and across records, and sampled cells re-run here must agree."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import benchmark
from slimbench.devtools.verify import compare_rerun, rerun, verify_folder
from slimbench.sweep.driver import run_cells
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite

torch.set_num_threads(1)
# One test worker for the file (make test runs pytest-xdist with --dist loadgroup): its tests share
# the module's results folder, which each worker would otherwise compute again.
pytestmark = pytest.mark.xdist_group("test_verify")

SUITE = """
models: [tiny-llama]
methods: [baseline, {name: rtn, bits: 4, group_size: 32}]
tasks: [{name: perplexity, seqlen: 32, max_windows: 2}]
hardware: {threads: 1}
"""


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A results folder of two ok cells, written by the runner."""
    root = tmp_path_factory.mktemp("verify")
    path = root / "suite.yaml"
    path.write_text(SUITE)
    results = root / "results"
    assert run_cells(load_suite(path).cells(), ResultStore(results), show_progress=False, log=lambda s: None).ok
    return results


@pytest.fixture
def results(clean, tmp_path):
    """A private copy to tamper with."""
    return shutil.copytree(clean, tmp_path / "results")


def files(results):
    return sorted((results / "runs").glob("*.json"))


def edit(path, change):
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


def errors(results) -> list[str]:
    return [str(f) for f in verify_folder(results).errors]


def test_a_clean_folder_verifies_and_its_reruns_agree(results, capsys):
    v = verify_folder(results)
    assert v.errors == [] and len(v.records) == 2
    # both cells re-run, through the command (rerun() behind it): each agrees. The re-run's
    # throughput is wall-clock on a machine the other test worker shares, so its tolerance is
    # opened here; the timing comparison itself is checked on fixed records below.
    assert benchmark.main(["verify", str(results), "--rerun", "2", "--timing-rtol", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "2 agree, 0 disagree" in out
    assert len([x for x in out.splitlines() if x.startswith("rerun agree")]) == 2
    line = next(x for x in out.splitlines() if x.startswith("rerun agree"))
    # the cell by model, method label and task, not by file
    assert "tiny-llama | " in line and "@concat-windows/1" in line and ".json" not in line


def test_rerun_comparison_judges_quality_tightly_and_timings_only_on_the_same_cpu():
    def rec(ppl, tok_s, cpu="cpu-a", stored=1000):
        return {"status": "ok", "environment": {"cpu": cpu},
                "metrics": {"perplexity": {"value": ppl, "unit": "ppl"},
                            "eval_tokens_per_s": {"value": tok_s, "unit": "tokens/s"}},
                "method_report": {"stored_bytes": stored}}

    old = rec(10.0, 1000.0)
    assert compare_rerun(old, rec(10.005, 1400.0), rtol=1e-3, timing_rtol=0.5) == []
    slow = compare_rerun(old, rec(10.0, 400.0), rtol=1e-3, timing_rtol=0.5)
    assert len(slow) == 1 and slow[0].startswith("eval_tokens_per_s: recorded 1000.0, here 400.0")
    # another CPU: its speed says nothing about the record, its quality still must agree
    assert compare_rerun(old, rec(10.0, 1.0, cpu="cpu-b"), rtol=1e-3, timing_rtol=0.5) == []
    wrong = compare_rerun(old, rec(10.2, 1000.0, cpu="cpu-b", stored=990), rtol=1e-3, timing_rtol=0.5)
    assert [w.split(":")[0] for w in wrong] == ["perplexity", "method_report.stored_bytes"]
    failed = {"status": "failed", "error": {"type": "RuntimeError", "message": "boom"}}
    assert compare_rerun(old, failed, rtol=1e-3, timing_rtol=0.5) == ["the re-run failed: RuntimeError: boom"]


def forge(rec, factor=0.9):
    """Scale perplexity and every per-window NLL consistently: the record agrees with itself."""
    import math

    nll = [x + math.log(factor) for x in rec["task_details"]["per_example"]["nll"]]
    rec["task_details"]["per_example"]["nll"] = nll
    rec["task_details"]["window_nll"] = nll
    rec["metrics"]["nll"]["value"] = sum(nll) / len(nll)
    rec["metrics"]["perplexity"]["value"] = math.exp(sum(nll) / len(nll))


def test_a_consistently_forged_metric_disagrees_on_rerun(results):
    first = files(results)[0]
    edit(first, forge)
    v = verify_folder(results)
    assert v.errors == []  # the record agrees with itself: only a re-run can tell
    rerun(v, 2, timing_rtol=1e6, log=lambda s: None)  # wall-clock on a shared machine: not the subject
    (bad,) = v.disagreements
    assert bad["file"] == first.name and any(p.startswith("perplexity: recorded") for p in bad["problems"])


def test_a_metric_edited_without_its_per_example_data_is_an_error(results):
    first = files(results)[0]
    edit(first, lambda r: r["metrics"]["perplexity"].update(value=r["metrics"]["perplexity"]["value"] * 1.49))
    found = errors(results)
    assert any("metric perplexity contradicts the record's own data" in e and "exp(mean of 2 per-example nll)" in e
               for e in found), found


def test_counts_and_timing_protocol_are_checked(results):
    first = files(results)[0]
    edit(first, lambda r: r["task_details"].update(windows=5))
    assert any("task_details.windows is 5, but its per-example data holds 2" in e for e in errors(results))


def test_protocol_fields_must_fit_the_task_version(results):
    first = files(results)[0]
    edit(first, lambda r: r["task_details"].update(protocol="rolling-loglikelihood"))
    assert any("its details say protocol 'rolling-loglikelihood'" in e for e in errors(results))


def test_efficiency_protocol_fields_against_the_installed_version():
    import fabricate as fb

    from slimbench.devtools.verify import Verification, check_protocol, installed_minimums
    from slimbench.registry import TASKS

    rec = fb.eff_v2("tiny-llama", fb.method("baseline"), (16, 4, 1), 1.0, 50.0)
    rec["task"]["version"] = str(TASKS.get("efficiency").version)
    v = Verification(root=None)
    minimums = installed_minimums(rec)
    check_protocol(v, "r.json", rec)
    if minimums is not None:  # this installation's efficiency states minimums: the record must carry them
        assert any("no timing_protocol" in str(f) for f in v.errors)
    rec["task_details"]["timing_protocol"] = {"repeats": 2, "min_repeats": 5, "timed_seconds": 0.1,
                                              "min_seconds": 1.0, "sufficient": True}  # claims enough
    rec["task_details"]["noisy"] = True  # flagged without a reason
    v = Verification(root=None)
    check_protocol(v, "r.json", rec)
    found = [str(f) for f in v.errors]
    assert any("says sufficient=True for 2 repeats" in e for e in found)
    assert any("details.noisy and details.noise_reasons disagree" in e for e in found)
    rec["task_details"]["regime"]["prompt_len"] = 99
    v = Verification(root=None)
    check_protocol(v, "r.json", rec)
    assert any("differs from the task parameters in prompt_len" in str(f) for f in v.errors)


def test_an_edited_spec_no_longer_matches_its_run_id(results):
    rtn = next(p for p in files(results) if json.loads(p.read_text())["method"]["name"] == "rtn")
    edit(rtn, lambda r: r["method"]["steps"][0]["params"].update(bits=8))
    assert any("is not the hash of its spec" in e for e in errors(results))


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"schema": 1, "metrics": {"perplexity": {"value": 3.5}}', "not valid JSON"),  # truncated
        ("[1, 2, 3]", "a JSON list, not a record"),
        ('{"hello": "world"}', "not a SlimBench record"),
    ],
)
def test_unreadable_or_foreign_files_are_errors_naming_the_file(results, content, message):
    (results / "runs" / "0000000000000000.json").write_text(content)
    assert any(e.startswith("error: 0000000000000000.json: ") and message in e for e in errors(results))


def test_non_finite_values_are_not_json(results):
    first = files(results)[0]
    first.write_text(first.read_text().replace('"value": ', '"value": NaN, "was": ', 1))
    assert any("NaN is not a JSON number" in e for e in errors(results))


def test_unknown_schema_and_incomplete_environment(results):
    a, b = files(results)
    edit(a, lambda r: r.update(schema=99))
    edit(b, lambda r: r["environment"].pop("torch"))
    found = errors(results)
    assert any("schema 99 is not one this version reads" in e for e in found)
    assert any("environment incomplete: no torch" in e for e in found)


def test_duplicate_and_contradictory_cells(results):
    a = files(results)[0]
    copy = results / "runs" / f"{a.stem}.failed.20200101T000000000000Z.json"
    shutil.copy(a, copy)  # an ok record under a second name: the same cell twice
    assert any("duplicate: 2 ok records of cell" in e for e in errors(results))
    edit(copy, lambda r: r["metrics"]["perplexity"].update(value=1.5))
    assert any("contradictory: 2 ok records of cell" in e for e in errors(results))


def test_nothing_in_the_folder_is_executed(results, tmp_path):
    marker = tmp_path / "executed"
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    runs = results / "runs"
    for name in ("sitecustomize.py", "__init__.py", "evil.py"):
        (runs / name).write_text(payload)
        (results / name).write_text(payload)
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, (payload,))

    (runs / "model.pkl").write_bytes(pickle.dumps(Boom()))
    # a cell whose model is a folder shipped inside the results, with code to run
    model_dir = results / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"auto_map": {"AutoModelForCausalLM": "modeling.M"}}')
    (model_dir / "modeling.py").write_text(payload)

    def point_at_the_folder(r):
        r["model"].update(name=str(model_dir), trust_remote_code=True)

    for path in files(results):  # both cells: the re-run sample finds only such cells
        edit(path, point_at_the_folder)
    v = verify_folder(results)
    rerun(v, 2, log=lambda s: None)
    assert not marker.exists()
    skipped = [r for r in v.reruns if r["status"] == "skipped"]
    assert len(skipped) == 2 and all("trust_remote_code" in r["reason"] for r in skipped)
    assert any("not a record file (ignored, never opened)" in str(f) for f in v.findings)


def test_a_local_model_path_is_not_rerun(results):
    for path in files(results):  # both cells: nothing else to re-run
        edit(path, lambda r: r["model"].update(name="/home/someone/model"))
    v = verify_folder(results)
    rerun(v, 2, log=lambda s: None)
    assert len(v.reruns) == 2 and all(r["status"] == "skipped" and "local path" in r["reason"] for r in v.reruns)


def test_cli_exit_status_and_missing_folder(results, tmp_path, capsys):
    assert benchmark.main(["verify", str(tmp_path / "nothing")]) == 1
    assert "no runs/ folder" in capsys.readouterr().out
    edit(files(results)[0], lambda r: r.update(status="maybe"))
    assert benchmark.main(["verify", str(results)]) == 1
