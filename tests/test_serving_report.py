"""Serving records in reports: the max-rate-within-SLO column, the serving section, the curves, compare."""

from __future__ import annotations

import copy
import math
import warnings

import fabricate as fb
import pytest

from slimbench.cli import main
from slimbench.report import serving, table
from slimbench.report.serving_plots import curve, write_serving_plots
from slimbench.report.write import write_report
from slimbench.sweep.store import ResultStore

SLO = {"ttft_ms": 1000.0, "itl_ms": 100.0, "e2e_ms": None, "percentile": 90.0}


def task(server="transformers", slo=None):
    return {"name": "serving", "version": "1", "provider": None,
            "params": {"server": server, "profile": "sweep", "slo": slo or SLO}}


def point(kind, target, rps, ttft, itl, met):
    objectives = {"ttft_ms": {"bound": 1000.0, "p90": ttft, "met": ttft <= 1000},
                  "itl_ms": {"bound": 100.0, "p90": itl, "met": itl <= 100}}
    return {"strategy": kind, "target": target, "request_throughput": rps, "output_tokens_per_s": 30 * rps,
            "latency": {"ttft_ms": {"p90": ttft}, "itl_ms": {"p90": itl}},
            "slo": {"met": met, "objectives": objectives, "goodput": rps if met else 0.0}}


def serving_record(meth, max_rps, *, server="transformers", slo_words="TTFT p90 ≤ 1000 ms, ITL p90 ≤ 100 ms",
                   execution="native", flavour=None, scale=1.0):
    pts = [point("synchronous", None, 0.5 * scale, 200, 40, True),
           point("constant", 1.0, 0.9 * scale, 400, 60, True),
           point("constant", 2.0, max_rps, 900, 90, True),
           point("throughput", None, 3.0 * scale, 5000, 150, False)]
    metrics = {"max_rps_within_slo": fb.m(max_rps, "requests/s", True),
               "max_request_throughput": fb.m(3.0 * scale, "requests/s", True),
               "sync_ttft_p50_ms": fb.m(150.0, "ms", False), "loadgen_cpu_share_in_load": fb.m(0.2, "fraction", False)}
    details = {"server": {"name": server, "flavour": flavour}, "slo": {"words": slo_words, **SLO},
               "load_points": pts, "noisy": False, "noise_reasons": [],
               "timing_protocol": {"repeats": 12, "min_repeats": 10, "timed_seconds": 80.0, "min_seconds": 0.0,
                                   "sufficient": True}}
    return fb.record("tiny-llama", meth, task(server), metrics, details=details, execution=execution)


def records():
    return [
        fb.ppl_record("tiny-llama", fb.method("baseline"), [2.0] * 8),
        fb.ppl_record("tiny-llama", fb.method("rtn", {"bits": 8}), [2.01] * 8),
        serving_record(fb.method("baseline"), 1.5),
        serving_record(fb.method("rtn", {"bits": 8}), 2.1, scale=1.3),
    ]


def test_the_leaderboard_gets_one_max_rate_column():
    lb = table.build(records())
    assert lb.serving == ["max req/s in SLO"] and "max req/s in SLO" in lb.columns()
    got = dict(zip(lb.df["method"], lb.df["max req/s in SLO"], strict=True))
    assert sorted(got.values()) == pytest.approx([1.5, 2.1]) and got["baseline"] == pytest.approx(1.5)


def test_servers_and_slos_get_their_own_columns():
    recs = [serving_record(fb.method("baseline"), 1.5),
            serving_record(fb.method("baseline"), 4.0, server="llama.cpp", flavour="native")]
    recs[1]["task"]["params"]["server"] = "llama.cpp"
    recs[1]["run_id"] = "other"
    cols = serving.column_names(recs)
    assert sorted(cols.values()) == [
        "max req/s in SLO [llama.cpp/native; TTFT p90 ≤ 1000 ms, ITL p90 ≤ 100 ms]",
        "max req/s in SLO [transformers; TTFT p90 ≤ 1000 ms, ITL p90 ≤ 100 ms]",
    ]
    lb = table.build(recs)
    row = lb.df.iloc[0]
    assert row[cols[("llama.cpp/native", recs[1]["task_details"]["slo"]["words"])]] == pytest.approx(4.0)
    assert row[cols[("transformers", recs[0]["task_details"]["slo"]["words"])]] == pytest.approx(1.5)


def test_a_leaderboard_without_serving_has_no_such_column():
    lb = table.build([fb.ppl_record("tiny-llama", fb.method("baseline"), [2.0] * 8)])
    assert lb.serving == [] and not any("req/s" in c for c in lb.columns())


def test_curve_in_offered_load_order_and_slo_flags():
    c = curve(serving_record(fb.method("baseline"), 1.5))
    assert c["x"] == [0.5, 0.9, 1.5, 3.0] and c["met"] == [True, True, True, False]
    assert c["ttft_ms"] == [200, 400, 900, 5000] and c["q"] == "p90"


def test_report_writes_the_section_and_one_plot_per_model_and_hardware(tmp_path):
    store = ResultStore(tmp_path / "r")
    recs = records()
    evil = serving_record(fb.method("evil-plugin", {"x": 1}, label="$x^2$ | <b>"), 1.0, execution="simulated")
    fb.write(store, [*recs, evil])
    out = write_report(store, tmp_path / "rep")
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "## Serving under load" in md and "max req/s in SLO" in md
    assert "<b>" not in md and "&lt;b&gt;" in md  # a plugin's label is text, not markup
    pngs = [p for p in out.files if p.name.startswith("serving_")]
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    assert f"]({pngs[0].name})" in md


def test_write_serving_plots_skips_records_without_load_points(tmp_path):
    rec = serving_record(fb.method("baseline"), 1.5)
    rec["task_details"]["load_points"] = []
    assert write_serving_plots([rec], tmp_path) == []


def test_compare_checks_the_max_rate(tmp_path, capsys):
    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    ra = serving_record(fb.method("baseline"), 2.0)
    rb = copy.deepcopy(ra)
    rb["metrics"]["max_rps_within_slo"]["value"] = 1.5  # 25% lower: worse (higher is better)
    fb.write(a, [ra])
    fb.write(b, [rb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compare", str(a.root), str(b.root), "--fail-if-worse", "max_rps_within_slo=10%"]) == 1
        assert "max_rps_within_slo" in capsys.readouterr().out
        assert main(["compare", str(a.root), str(b.root), "--fail-if-worse", "max_rps_within_slo=30%"]) == 0
        assert main(["compare", str(b.root), str(a.root), "--fail-if-worse", "max_rps_within_slo=0"]) == 0
    assert math.isfinite(ra["metrics"]["max_rps_within_slo"]["value"])


def test_compare_does_not_judge_an_under_sampled_serving_cell(tmp_path, capsys):
    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    ra = serving_record(fb.method("baseline"), 2.0)
    rb = copy.deepcopy(ra)
    rb["metrics"]["max_rps_within_slo"]["value"] = 1.0
    rb["task_details"]["timing_protocol"].update(repeats=4, sufficient=False)  # a load point of 4 requests
    fb.write(a, [ra])
    fb.write(b, [rb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compare", str(a.root), str(b.root), "--fail-if-worse", "max_rps_within_slo=10%"]) == 3
    assert "under-sampled" in capsys.readouterr().out
