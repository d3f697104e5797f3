"""The serving task's parts that need no server: workload, load points, SLO, goodput, CPU, config.

Servers and the load generator run in tests/test_serving_net.py, inside a loopback-only
network namespace.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from slimbench.tasks.serving import ServingConfig

from slimbench.config import build_config
from slimbench.engines.serving import analysis
from slimbench.engines.serving.workload import WorkloadSpec, blocks_of, build_rows, write_rows
from slimbench.errors import SuiteError
from slimbench.registry import CORPORA
from slimbench.zoo.models import gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


# -- workload -----------------------------------------------------------------------------------
def test_workload_is_real_text_with_lengths_from_the_text(tok):
    spec = WorkloadSpec(requests=40, prompt_blocks=3, max_prompt_tokens=10_000, min_output_tokens=2,
                        max_output_tokens=10_000, seed=3)
    rows = build_rows(tok, spec)
    blocks = blocks_of(CORPORA.get("shakespeare").texts("test"))
    joined = ["\n\n".join(blocks[i : i + 3]) for i in range(len(blocks) - 3)]
    index = {text: i for i, text in enumerate(joined)}
    for r in rows:
        i = index[r["prompt"]]  # the prompt is three consecutive blocks, verbatim
        reply = len(tok(blocks[i + 3], add_special_tokens=False)["input_ids"])
        assert r["output_tokens_count"] == max(reply, 2)  # the following block's length
        assert r["prompt_tokens"] == len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
    assert len({r["output_tokens_count"] for r in rows}) > 5  # a distribution, not one length


def test_workload_caps_and_seed(tok, tmp_path):
    spec = WorkloadSpec(requests=30, max_prompt_tokens=32, min_output_tokens=8, max_output_tokens=20, seed=0)
    rows = build_rows(tok, spec)
    assert all(r["prompt_tokens"] <= 32 and 8 <= r["output_tokens_count"] <= 20 for r in rows)
    assert {8, 20} <= {r["output_tokens_count"] for r in rows}  # both clips are hit on real text
    assert build_rows(tok, spec) == rows
    assert build_rows(tok, WorkloadSpec(requests=30, max_prompt_tokens=32, min_output_tokens=8,
                                        max_output_tokens=20, seed=1)) != rows
    a, b = write_rows(rows, tmp_path / "a.jsonl"), write_rows(rows, tmp_path / "b.jsonl")
    assert a["sha256"] == b["sha256"] and a["requests"] == 30
    assert a["output_tokens"]["min"] >= 8 and a["output_tokens"]["max"] <= 20


# -- load points from a GuideLLM-shaped report ----------------------------------------------------
def request(ttft, itl, e2e, out=10, prompt=50, delay=0.001):
    return {"time_to_first_token_ms": ttft, "inter_token_latency_ms": itl, "request_latency": e2e / 1e3,
            "output_tokens": out, "prompt_tokens": prompt, "request_dispatch_delay": delay}


def bench(kind, target, ok, errored=0, duration=10.0, start=100.0):
    strategy = {"type_": kind, **({"rate": target} if kind in ("constant", "poisson") else {}),
                **({"streams": target} if kind == "concurrent" else {})}
    errs = [{"info": {"error": "HTTP 500"}} for _ in range(errored)]
    return {"config": {"strategy": strategy}, "start_time": start, "end_time": start + duration,
            "duration": duration, "requests": {"successful": ok, "errored": errs, "incomplete": []}, "metrics": {}}


def test_the_measured_requests_are_those_guidellm_counts():
    # GuideLLM counts a request when it overlaps the measured window (its warm-up ends before it)
    spans = [(98.0, 99.0), (99.0, 100.6), (100.5, 101.0), (110.0, 112.0), (111.0, 112.0)]
    ok = [{**request(50, 10, 100), "request_start_time": a, "request_end_time": b} for a, b in spans]
    b = {**bench("concurrent", 2, ok), "scheduler_metrics": {"measure_start_time": 100.5, "measure_end_time": 110.5}}
    p = analysis.load_point(b)
    assert p.successful == 3 and p.duration_s == pytest.approx(10.0) and (p.start, p.end) == (100.5, 110.5)


def test_load_point_numbers_are_the_requests_own():
    rng = np.random.default_rng(0)
    ttft, itl = rng.uniform(10, 500, 40), rng.uniform(5, 50, 40)
    e2e = ttft + 9 * itl
    point = analysis.load_point(bench("constant", 2.0, [request(*x) for x in zip(ttft, itl, e2e, strict=True)]))
    assert point.strategy == "constant" and point.target == 2.0
    assert point.request_throughput == pytest.approx(40 / 10.0)
    assert point.output_tokens_per_s == pytest.approx(400 / 10.0)
    for q in (50, 90, 99):
        assert point.latency["ttft_ms"][f"p{q}"] == pytest.approx(np.percentile(ttft, q))
        assert point.latency["itl_ms"][f"p{q}"] == pytest.approx(np.percentile(itl, q))
        assert point.latency["e2e_ms"][f"p{q}"] == pytest.approx(np.percentile(e2e, q))


def test_slo_percentile_goodput_and_errors():
    slo = analysis.SLO(ttft_ms=100, itl_ms=20, e2e_ms=None, percentile=90)
    # 10 requests: 9 within both bounds, one with a slow first token -> p90 (nearest rank) still 9th
    ok = [request(50, 10, 200) for _ in range(9)] + [request(900, 10, 1000)]
    p = analysis.load_point(bench("constant", 1.0, ok))
    j = analysis.judge(p, slo)
    assert j["met"] and j["conforming_requests"] == 9 and j["goodput"] == pytest.approx(0.9)
    # two failed requests among 10: they miss every objective, the 90th percentile is infinite
    p = analysis.load_point(bench("constant", 1.0, ok[:8], errored=2))
    j = analysis.judge(p, slo)
    assert not j["met"] and j["objectives"]["ttft_ms"]["p90"] is None and p.error_rate == pytest.approx(0.2)
    assert j["conforming_requests"] == 8
    # a slow ITL alone breaks it
    p = analysis.load_point(bench("constant", 1.0, [request(50, 30, 300) for _ in range(10)]))
    assert not analysis.judge(p, slo)["met"]


def test_requests_cut_off_by_the_time_bound_count_with_what_they_reached():
    slo = analysis.SLO(ttft_ms=100, itl_ms=None, e2e_ms=None, percentile=90)
    b = bench("constant", 1.0, [request(50, 10, 200) for _ in range(9)])
    b["requests"]["incomplete"] = [{"time_to_first_token_ms": 60.0}]  # got its first token in time
    p = analysis.load_point(b)
    assert p.incomplete == 1 and p.error_rate == 0.0 and analysis.judge(p, slo)["met"]
    b["requests"]["incomplete"] = [{}, {}]  # never got a first token: too slow
    p = analysis.load_point(b)
    assert not analysis.judge(p, slo)["met"]
    assert not analysis.judge(p, analysis.SLO(ttft_ms=None, itl_ms=None, e2e_ms=10_000))["met"]  # never ended


def test_max_rate_within_slo_is_the_highest_passing_throughput():
    slo = analysis.SLO(ttft_ms=100, itl_ms=None, percentile=90)
    points = [
        analysis.load_point(bench("synchronous", None, [request(20, 5, 100)] * 5, duration=10)),  # 0.5 req/s, ok
        analysis.load_point(bench("constant", 1.0, [request(60, 5, 100)] * 20, duration=10)),  # 2 req/s, ok
        analysis.load_point(bench("constant", 2.0, [request(300, 5, 100)] * 30, duration=10)),  # 3 req/s, late
        analysis.load_point(bench("throughput", None, [request(900, 5, 100)] * 40, duration=10)),  # 4 req/s, late
    ]
    s = analysis.summarize(points, slo)
    assert s["max_rps_within_slo"] == pytest.approx(2.0)
    assert s["max_rps_within_slo_point"] == ("constant", 1.0)
    assert s["max_request_throughput"] == pytest.approx(4.0)
    assert s["max_goodput_rps"] == pytest.approx(2.0)
    assert s["sync"] is points[0]
    # nothing meets it: zero, not a missing value
    assert analysis.summarize(points[2:], slo)["max_rps_within_slo"] == 0.0


def test_cpu_between_interpolates_cumulative_samples():
    # server 1 core, generator 0.25 cores, machine 2 cores busy -> others 0.75
    timeline = [(t, 1.0 * t, 0.25 * t, 2.0 * t) for t in (0.0, 1.0, 2.5, 4.0)]
    cpu = analysis.cpu_between(timeline, 0.5, 3.5)
    assert cpu["server_cores"] == pytest.approx(1.0)
    assert cpu["loadgen_cores"] == pytest.approx(0.25)
    assert cpu["other_cores"] == pytest.approx(0.75)
    assert analysis.cpu_between(timeline[:1], 0, 1) == {}


def test_slo_words():
    assert analysis.SLO(1000, 100, None, 90).words() == "TTFT p90 ≤ 1000 ms, ITL p90 ≤ 100 ms"
    assert math.isfinite(analysis.SLO(None, None, 5000, 99).objectives()["e2e_ms"])


# -- the task's config ------------------------------------------------------------------------------
def cfg(**params):
    return build_config(ServingConfig, params, source="suite.yaml", field="tasks[0]")


def test_config_profiles_map_to_guidellm():
    assert cfg().profile_args() == {"kind": "sweep", "sweep_size": 6, "strategy_type": "constant"}
    assert cfg(profile="poisson", rates=[0.5, 1]).profile_args() == {"kind": "poisson", "rate": [0.5, 1.0]}
    assert cfg(profile="concurrent", streams=[1, 4]).load_points() == 2
    assert cfg(profile="synchronous").profile_args() == {"kind": "synchronous"}
    assert cfg(profile="throughput", max_concurrency=8).profile_args() == {"kind": "throughput", "max_concurrency": 8}
    s = cfg(slo={"ttft_ms": 500, "itl_ms": None, "percentile": 99}).slo.slo()
    assert s.objectives() == {"ttft_ms": 500} and s.percentile == 99


@pytest.mark.parametrize("params, words", [
    ({"profile": "concurrent"}, "needs streams"),
    ({"profile": "constant"}, "needs rates"),
    ({"profile": "poisson", "rates": [0]}, "rates must be > 0"),
    ({"slo": {"ttft_ms": None, "itl_ms": None}}, "at least one"),
    ({"min_output_tokens": 50, "max_output_tokens": 10}, "min_output_tokens"),
    ({"server": "tgi"}, "server"),
    ({"rate": [1]}, "did you mean"),
])
def test_config_refuses_bad_input_naming_the_field(params, words):
    with pytest.raises(SuiteError, match=words):
        cfg(**params)


def test_a_profile_list_in_a_suite_is_a_grid_and_rates_are_one_curve(tmp_path):
    from slimbench.sweep.suite import load_suite

    path = tmp_path / "s.yaml"
    path.write_text("models: [tiny-llama]\nmethods: [baseline]\n"
                    "tasks: [{name: serving, profile: [constant, poisson], rates: [0.5, 1, 2]}]\n")
    cells = load_suite(str(path)).cells()
    assert sorted(c.task.params["profile"] for c in cells) == ["constant", "poisson"]
    assert all(c.task.params["rates"] == [0.5, 1.0, 2.0] for c in cells)


def test_a_load_point_of_few_requests_makes_the_cell_under_sampled():
    from slimbench.tasks.serving import MIN_POINT_REQUESTS, _timing_protocol

    few = analysis.load_point(bench("synchronous", None, [request(20, 5, 100)] * 3, errored=1))
    many = analysis.load_point(bench("constant", 1.0, [request(20, 5, 100)] * MIN_POINT_REQUESTS))
    proto = _timing_protocol([few, many])
    assert proto["repeats"] == 4 and not proto["sufficient"]  # the failed request counts as measured
    assert _timing_protocol([many])["sufficient"] and _timing_protocol([many])["timed_seconds"] == 10.0
