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
    a = folder(tmp_path, "a", [ppl(), ppl(meth=fb.method("magnitude")), ppl(meth=fb.method("svd")),
                               ppl(meth=fb.method("cast")), ppl(meth=fb.method("baseline"))])
    b = folder(tmp_path, "b", [
        ppl(shift=0.01),  # the same cell: compared
        ppl(meth=fb.method("magnitude", version="2")),  # another method version
        ppl(meth=fb.method("svd"), env=other_cpu),  # another machine class
        ppl(meth=fb.method("cast"), hw={**fb.HW, "threads": 2}),  # another thread count
        other_task,  # the baseline is missing in B; rtn at another seqlen
        ppl("tiny-gpt2"),  # only in B
    ])
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
    assert same.noise["within_noise"] and "paired bootstrap over 40 examples" in same.noise["how"]
    assert not worse.noise["within_noise"] and worse.worse and worse.delta > 0


def test_repeats_give_the_noise_of_latencies(tmp_path):
    slow = fb.eff_v1("tiny-llama", fb.method("rtn"), 500, 600)
    fast = fb.eff_v1("tiny-llama", fb.method("rtn"), 520, 600)
    for r, samples in ((slow, [490.0, 500.0, 510.0, 495.0, 505.0]), (fast, [492.0, 502.0, 512.0, 497.0, 507.0])):
        r["metrics"]["decode_tokens_per_s"]["samples"] = samples
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
    assert "nothing was checked" in capsys.readouterr().out
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
    assert "<script" not in page


def test_parse_rule():
    assert compare.parse_rule("perplexity=2%") == ("perplexity", 0.02, True)
    assert compare.parse_rule("wikitext/word_perplexity=0.5") == ("wikitext/word_perplexity", 0.5, False)
    for bad in ("perplexity", "=1", "perplexity=x", "perplexity=-1"):
        with pytest.raises(ValueError, match="fail-if-worse"):
            compare.parse_rule(bad)
