"""`compare`: only like with like, deltas with their noise, regression exit codes."""

from __future__ import annotations

import copy
import warnings

import fabricate as fb
import pytest

from slimbench.cli import main
from slimbench.report import compare, records
from slimbench.sweep.store import ResultStore

BASE = [2.0 + 0.05 * (i % 5) for i in range(40)]


def ppl(model="tiny-llama", meth=None, shift=0.0, **kw):
    return fb.ppl_record(model, meth or fb.method("rtn"), [b + shift for b in BASE], **kw)


def folder(tmp_path, name, recs):
    s = ResultStore(tmp_path / name)
    fb.write(s, recs)
    return s


def loaded(store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return records.load(store)


def test_matches_only_like_with_like(tmp_path):
    other_cpu = {**fb.ENV, "cpu": "Other CPU"}
    other_task = ppl()
    other_task["task"] = copy.deepcopy(other_task["task"])
    other_task["task"]["params"]["seqlen"] = 128
    other_task["run_id"] = "seqlen128"
    a = folder(
        tmp_path,
        "a",
        [
            ppl(),
            ppl(meth=fb.method("magnitude")),
            ppl(meth=fb.method("svd")),
            ppl(meth=fb.method("cast")),
            ppl(meth=fb.method("baseline")),
        ],
    )
    b = folder(
        tmp_path,
        "b",
        [
            ppl(shift=0.01),  # the same cell: compared
            ppl(meth=fb.method("magnitude", version="2")),  # another method version
            ppl(meth=fb.method("svd"), env=other_cpu),  # another machine class
            ppl(meth=fb.method("cast"), hw={**fb.HW, "threads": 2}),  # another thread count
            other_task,  # the baseline is missing in B; rtn at another seqlen
            ppl("tiny-gpt2"),  # only in B
        ],
    )
    cmp = compare.compare(loaded(a), loaded(b))
    assert [p.a["method"]["name"] for p in cmp.pairs] == ["rtn"]
    why = {a_["method"]["name"]: "; ".join(w) for a_, _, w in cmp.not_comparable}
    assert "method config and version" in why["magnitude"] and "v1 vs" in why["magnitude"] and "v2" in why["magnitude"]
    assert why["svd"].startswith("hardware class") and "Other CPU" in why["svd"]
    assert "1 thread" in why["cast"] and "2 threads" in why["cast"]
    assert "task parameters" in why["rtn"] and '"seqlen": 128' in why["rtn"]
    assert [r["method"]["name"] for r in cmp.only_a] == ["baseline"]
    assert [r["model"]["name"] for r in cmp.only_b] == ["tiny-gpt2"]


def test_paired_bootstrap_decides_noise(tmp_path):
    a = folder(tmp_path, "a", [ppl()])
    jitter = [b + (0.002 if i % 2 else -0.002) for i, b in enumerate(BASE)]  # mean shift 0: noise
    b_same = folder(tmp_path, "b1", [fb.ppl_record("tiny-llama", fb.method("rtn"), jitter)])
    b_worse = folder(tmp_path, "b2", [ppl(shift=0.05)])
    same = next(d for d in compare.compare(loaded(a), loaded(b_same)).pairs[0].deltas if d.metric == "perplexity")
    worse = next(d for d in compare.compare(loaded(a), loaded(b_worse)).pairs[0].deltas if d.metric == "perplexity")
    assert same.noise["within_noise"] and "paired bootstrap" in same.noise["how"] and "40 examples" in same.noise["how"]
    assert not worse.noise["within_noise"] and worse.worse and worse.delta > 0


def test_repeats_give_the_noise_of_latencies(tmp_path):
    slow = fb.eff_v1("tiny-llama", fb.method("rtn"), 500, 600)
    fast = fb.eff_v1("tiny-llama", fb.method("rtn"), 502, 600)
    for r, samples in ((slow, [490.0, 500.0, 510.0, 495.0, 505.0]), (fast, [492.0, 502.0, 512.0, 497.0, 507.0])):
        r["metrics"]["decode_tokens_per_s"]["samples"] = samples  # the value is their median
    cmp = compare.compare(loaded(folder(tmp_path, "a", [slow])), loaded(folder(tmp_path, "b", [fast])))
    d = next(d for d in cmp.pairs[0].deltas if d.metric == "decode_tokens_per_s")
    assert d.noise["within_noise"] and "spread of repeats (5 vs 5 samples" in d.noise["how"]
    peak = next(d for d in cmp.pairs[0].deltas if d.metric == "peak_memory_mb")
    assert peak.noise is None  # one value per side: no interval invented


def test_interval_of_repeats_excludes_zero_for_a_clear_change():
    iv = compare.repeats_interval([10.0, 10.1, 9.9, 10.05, 9.95], [12.0, 12.1, 11.9, 12.05, 11.95])
    assert not iv["within_noise"] and 1.7 < iv["ci_low"] <= iv["ci_high"] < 2.3


def run_cli(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["compare", *map(str, args)])


def test_fail_if_worse_exit_codes(tmp_path, capsys):
    a = folder(tmp_path, "a", [ppl()])
    b = folder(tmp_path, "b", [ppl(shift=0.05)])  # perplexity about +5%, beyond noise
    assert run_cli(a.root, b.root, "--fail-if-worse", "perplexity=1%") == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert run_cli(a.root, b.root, "--fail-if-worse", "perplexity=10%") == 0
    assert run_cli(a.root, b.root, "--fail-if-worse", "perplexity/perplexity=0.5") == 0  # task/metric, absolute
    assert run_cli(b.root, a.root, "--fail-if-worse", "perplexity=0") == 0  # better is never a regression
    assert run_cli(a.root, b.root, "--fail-if-worse", "acc=1%") == 2  # nothing to check is not a pass
    assert "nothing would be checked" in capsys.readouterr().err
    assert run_cli(a.root, b.root, "--fail-if-worse", "perplexity") == 2
    assert "METRIC=TOL" in capsys.readouterr().err


def test_absolute_tolerance(tmp_path):
    a = folder(tmp_path, "a", [ppl()])
    b = folder(tmp_path, "b", [ppl(shift=0.05)])
    d = next(d for d in compare.compare(loaded(a), loaded(b)).pairs[0].deltas if d.metric == "perplexity")
    assert run_cli(a.root, b.root, "--fail-if-worse", f"perplexity={d.delta * 1.01}") == 0
    assert run_cli(a.root, b.root, "--fail-if-worse", f"perplexity={d.delta * 0.99}") == 1


def test_outputs_escaped_markdown_and_html(tmp_path):
    evil = fb.method("evil", {"x": fb.SCRIPT}, label=fb.SCRIPT)
    model = "![x](http://evil.example/x.png)"
    a = folder(tmp_path, "a", [ppl(model, evil)])
    b = folder(tmp_path, "b", [ppl(model, evil, shift=0.01), ppl(model, fb.method("baseline"))])
    assert run_cli(a.root, b.root, "--out", tmp_path / "out") == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    page = (tmp_path / "out" / "compare.html").read_text()
    assert "![x](" not in md and "<script" not in md and "Only in B (1)" in md
    assert fb.SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script") == 1 and '<script nonce="' in page  # only the page's own script


def test_parse_rule():
    assert compare.parse_rule("perplexity=2%") == ("perplexity", 0.02, True)
    assert compare.parse_rule("wikitext/word_perplexity=0.5") == ("wikitext/word_perplexity", 0.5, False)
    for bad in ("perplexity", "=1", "perplexity=x", "perplexity=-1"):
        with pytest.raises(ValueError, match="fail-if-worse"):
            compare.parse_rule(bad)


# -- a summary first, significance order, trust of timings, intervals that hold their estimate -------------
def mixed_folders(tmp_path):
    """A and B: rtn worse beyond noise, magnitude better, cast within noise, svd identical."""
    jitter = [b + (0.002 if i % 2 else -0.002) for i, b in enumerate(BASE)]
    a = [ppl(meth=fb.method(m)) for m in ("rtn", "magnitude", "cast", "svd")]
    b = [
        ppl(meth=fb.method("rtn"), shift=0.05),
        ppl(meth=fb.method("magnitude"), shift=-0.03),
        fb.ppl_record("tiny-llama", fb.method("cast"), jitter),
        ppl(meth=fb.method("svd")),
    ]
    return folder(tmp_path, "a", a), folder(tmp_path, "b", b)


def table_lines(md: str) -> list[list[str]]:
    block = md.split("## Compared cells")[1].split("\n## ")[0]
    lines = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def test_summary_first_then_rows_by_significance_without_constants(tmp_path, capsys):
    a, b = mixed_folders(tmp_path)
    assert run_cli(a.root, b.root, "--out", tmp_path / "out") == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert md.index("## Summary") < md.index("## Compared cells")
    summary = md.split("## Summary")[1].split("##")[0]
    assert "4 cells compared: 2 metric(s) worse beyond noise (in 1 cell(s)), 2 better beyond noise" in summary
    assert "2 within noise" in summary and "identical on both sides" in summary
    head, *body = table_lines(md)
    assert all(head) and head[-1] == "verdict" and head[-2] == "timing"  # every column labelled
    verdicts = [r[-1] for r in body]
    assert verdicts == ["worse", "worse", "better", "better", "within noise", "within noise"]
    assert not [r for r in body if "svd" in r[0]]  # identical values: counted, not listed
    assert "svd" in compare_render_all(a, b)


def compare_render_all(a, b):
    from slimbench.report import compare_render

    return compare_render.markdown(compare.compare(loaded(a), loaded(b)), all_rows=True)


def eff_pair(tmp_path, *, b_noisy=False, b_protocol=None, repeats=8, slower=1.0):
    def rec(speed, noisy, protocol):
        r = fb.eff_v2("tiny-llama", fb.method("rtn"), (128, 32, 1), speed, 50.0, noisy=noisy)
        m = r["metrics"]["decode_tokens_per_s"]
        m["samples"] = [m["value"] * (1 + 0.001 * (k - repeats // 2)) for k in range(repeats)]
        m["value"] = (
            sorted(m["samples"])[repeats // 2]
            if repeats % 2
            else sum(sorted(m["samples"])[repeats // 2 - 1 : repeats // 2 + 1]) / 2
        )
        if protocol is not None:
            r["task_details"]["timing_protocol"] = protocol
        return r

    ok = {"repeats": repeats, "min_repeats": 5, "timed_seconds": 3.0, "min_seconds": 2.0, "sufficient": True}
    a = folder(tmp_path, "a", [rec(1.0, False, ok)])
    b = folder(tmp_path, "b", [rec(1.0 / slower, b_noisy, ok if b_protocol is None else b_protocol)])
    return a, b


def test_fail_if_worse_refuses_noisy_timings_with_its_own_exit_code(tmp_path, capsys):
    a, b = eff_pair(tmp_path, b_noisy=True, slower=1.8)  # 44% slower, but B's timing is noisy
    assert run_cli(a.root, b.root, "--fail-if-worse", "decode_tokens_per_s=10%") == 3
    out = capsys.readouterr().out
    assert "NOT JUDGED" in out and "noisy" in out and "REGRESSION" not in out
    row = next(r for r in table_lines(out) if r[2].replace("\\", "") == "decode_tokens_per_s")
    assert row[-2].startswith("noisy (B)") and row[-1] == "not judged: noisy timing"
    assert run_cli(a.root, b.root, "--fail-if-worse", "decode_tokens_per_s=10%", "--allow-noisy") == 1
    assert "--allow-noisy" in capsys.readouterr().out


def test_under_sampled_timings_are_not_judged(tmp_path, capsys):
    thin = {"repeats": 2, "min_repeats": 5, "timed_seconds": 0.3, "min_seconds": 2.0, "sufficient": False}
    a, b = eff_pair(tmp_path, b_protocol=thin, slower=1.8)
    assert run_cli(a.root, b.root, "--fail-if-worse", "decode_tokens_per_s=10%") == 3
    assert "under-sampled" in capsys.readouterr().out
    # a record from before the protocol's minimums, with 2 repeats a side: no interval, not judged
    old_a = fb.eff_v1("tiny-llama", fb.method("rtn"), 500, 600)
    old_b = fb.eff_v1("tiny-llama", fb.method("rtn"), 280, 600)
    a2, b2 = folder(tmp_path, "a2", [old_a]), folder(tmp_path, "b2", [old_b])
    d = next(d for d in compare.compare(loaded(a2), loaded(b2)).pairs[0].deltas if d.metric == "decode_tokens_per_s")
    assert d.noise is None and d.flag.startswith("under-sampled")
    assert run_cli(a2.root, b2.root, "--fail-if-worse", "decode_tokens_per_s=10%") == 3
    # quality metrics are never timings: a trusted regression still fails
    a3, b3 = mixed_folders(tmp_path / "m")
    assert run_cli(a3.root, b3.root, "--fail-if-worse", "perplexity=1%") == 1


def test_misspelt_metric_gets_did_you_mean_before_any_table(tmp_path, capsys):
    a, b = mixed_folders(tmp_path)
    assert run_cli(a.root, b.root, "--fail-if-worse", "perplexty=1%") == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no table printed first
    assert "did you mean perplexity" in captured.err
    assert captured.err.count("--fail-if-worse") == 1  # the prefix once


def test_malformed_rule_error_names_its_prefix_once(tmp_path, capsys):
    a, b = mixed_folders(tmp_path)
    for rule in ("perplexity", "perplexity=x"):
        assert run_cli(a.root, b.root, "--fail-if-worse", rule) == 2
        err = capsys.readouterr().err
        assert err.count("--fail-if-worse") == 1 and err.startswith("error: --fail-if-worse"), err


def test_a_hand_edited_metric_gets_no_interval_that_excludes_it(tmp_path, capsys):
    a = folder(tmp_path, "a", [ppl()])
    edited = ppl()
    edited["metrics"]["perplexity"]["value"] *= 1.49  # the headline changed, its per-window NLL not
    b = folder(tmp_path, "b", [edited])
    d = next(d for d in compare.compare(loaded(a), loaded(b)).pairs[0].deltas if d.metric == "perplexity")
    assert d.noise is None and "per-example nll" in d.inconsistent and d.verdict == "inconsistent record"
    assert run_cli(a.root, b.root, "--fail-if-worse", "perplexity=1%") == 3
    out = capsys.readouterr().out
    assert "within noise [0, 0]" not in out and "contradicts its own data" in out


def test_every_interval_holds_its_point_estimate(tmp_path):
    import random

    rng = random.Random(1)
    recs_a, recs_b = [], []
    for k in range(12):
        base = [2.0 + 0.3 * rng.random() for _ in range(24)]
        other = [x + rng.gauss(0.02 * (k - 6), 0.01) for x in base]
        meth = fb.method("rtn", {"bits": 2 + k % 7, "group_size": 32 * (1 + k // 7)})
        recs_a.append(fb.ppl_record("tiny-llama", meth, base))
        recs_b.append(fb.ppl_record("tiny-llama", meth, other))
    cmp = compare.compare(loaded(folder(tmp_path, "a", recs_a)), loaded(folder(tmp_path, "b", recs_b)))
    checked = 0
    for p in cmp.pairs:
        for d in p.deltas:
            if d.noise:
                assert d.noise["ci_low"] - 1e-9 <= d.delta <= d.noise["ci_high"] + 1e-9, (d.metric, d.delta, d.noise)
                checked += 1
    ppl_deltas = [d for p in cmp.pairs for d in p.deltas if d.metric == "perplexity"]
    nll_deltas = [d for p in cmp.pairs for d in p.deltas if d.metric == "nll"]
    assert checked == 24 and all(d.noise for d in ppl_deltas)
    # the perplexity verdict is the NLL's (perplexity is exp of the mean NLL)
    assert [d.noise["within_noise"] for d in ppl_deltas] == [d.noise["within_noise"] for d in nll_deltas]


def test_compare_html_sorts_and_filters(tmp_path):
    a, b = mixed_folders(tmp_path)
    assert run_cli(a.root, b.root, "--out", tmp_path / "out") == 0
    page = (tmp_path / "out" / "compare.html").read_text()
    assert '<input id="q"' in page and '<select id="verdict">' in page and page.count("<script") == 1
    assert "script-src &#x27;nonce-" in page and 'data-verdict="worse"' in page and 'data-v="' in page
