"""Timings that are not results (noisy, under-sampled) in every table and plot; plots that say what
they cannot show; plain log ticks; labels off the frontier line; records without a timing protocol."""

from __future__ import annotations

import io
import math
import warnings

import fabricate as fb
import pandas as pd
import pytest

from slimbench.report import records, table
from slimbench.report.plots import write_plots
from slimbench.report.write import write_report
from slimbench.sweep.store import ResultStore

REG = (128, 32, 1)
DECODE = "decode tok/s"


def under_sampled(rec: dict) -> dict:
    rec["task_details"]["timing_protocol"] = {
        "repeats": 2,
        "min_repeats": 5,
        "timed_seconds": 0.4,
        "min_seconds": 2.0,
        "sufficient": False,
    }
    return rec


def trusted(rec: dict) -> dict:
    rec["task_details"]["timing_protocol"] = {
        "repeats": 8,
        "min_repeats": 5,
        "timed_seconds": 3.0,
        "min_seconds": 2.0,
        "sufficient": True,
    }
    return rec


def one_regime_records() -> list[dict]:
    """baseline and rtn trusted, cast noisy, svd under-sampled; one efficiency regime."""
    out = []
    for key, speed in (("baseline", 1.0), ("cast", 1.6), ("svd", 1.25), ("rtn8", 1.01)):
        meth, execution, shift, _, rep = fb.methods()[key]
        out.append(fb.ppl_record("tiny-llama", meth, [2.0 + shift] * 8, execution=execution, report=rep))
        eff = fb.eff_v2("tiny-llama", meth, REG, speed, 50.0, noisy=key == "cast", execution=execution, report=rep)
        out.append(under_sampled(eff) if key == "svd" else trusted(eff))
    return out


def report(tmp_path, recs, **kw):
    s = ResultStore(tmp_path / "r")
    fb.write(s, recs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_report(s, tmp_path / "report", **kw)


def board(tmp_path, recs):
    s = ResultStore(tmp_path / "b")
    fb.write(s, recs)
    return table.build(records.load(s).ok)


def test_flagged_timings_are_marked_in_every_table(tmp_path):
    out = report(tmp_path, one_regime_records(), plots=False, html=True)
    # console
    lines = {line.split("  ")[1].strip(): line for line in out.summary.splitlines() if line.startswith("tiny-llama")}
    assert "(noisy)" in lines["cast(bfloat16)"] and "(under-sampled)" in lines["svd(ratio=0.2)"]
    assert "(" not in lines["baseline"].split("baseline", 1)[1]
    # Markdown: the flag beside the value, memory never flagged
    md = (out.folder / "leaderboard.md").read_text()
    cast = next(line for line in md.splitlines() if line.startswith("| tiny-llama | cast"))
    assert "(noisy)" in cast and cast.count("(noisy)") == 4  # TTFT, prefill, decode ms/token, decode tok/s
    # CSV: a flag column right after each flagged timing column, none for memory
    df = pd.read_csv(out.folder / "leaderboard.csv", keep_default_na=False).set_index("method")
    assert df.loc["cast(bfloat16)", f"{DECODE} flag"] == "noisy"
    assert df.loc["svd(ratio=0.2)", f"{DECODE} flag"] == "under-sampled"
    assert df.loc["baseline", f"{DECODE} flag"] == ""
    assert "peak mem MiB flag" not in df and "weights MiB flag" not in df
    cols = list(df.columns)
    assert cols[cols.index(DECODE) + 1] == f"{DECODE} flag"
    # LaTeX: a mark on each flagged value, explained in the caption
    tex = (out.folder / "leaderboard.tex").read_text()
    assert "$^{n}$" in next(line for line in tex.splitlines() if line.startswith("tiny-llama & cast"))
    assert "$^{u}$" in next(line for line in tex.splitlines() if line.startswith("tiny-llama & svd"))
    assert "$^{n}$" not in next(line for line in tex.splitlines() if line.startswith("tiny-llama & baseline"))
    # HTML: the flag in the cell itself
    page = (out.folder / "report.html").read_text()
    assert '<span class="flag">noisy</span>' in page and '<span class="flag">under-sampled</span>' in page


def test_console_prints_a_dash_where_markdown_does(tmp_path):
    recs = [*one_regime_records(), fb.ppl_record("tiny-llama", fb.method("magnitude"), [2.3] * 8)]
    out = report(tmp_path, recs, plots=False)
    assert "NaN" not in out.summary and "nan" not in out.summary
    mag = next(line for line in out.summary.splitlines() if "magnitude" in line)
    assert mag.rstrip().endswith("–")  # no efficiency cell: the dash, as in the Markdown


def test_records_without_a_timing_protocol_still_render_unflagged(tmp_path):
    recs = [
        fb.ppl_record("tiny-gpt2", fb.method("baseline"), [3.0] * 4),
        fb.eff_v1("tiny-gpt2", fb.method("baseline"), 500, 600),
        fb.eff_v1("tiny-gpt2", fb.method("rtn"), 480, 610, execution="simulated"),
        fb.ppl_record("tiny-gpt2", fb.method("rtn"), [3.1] * 4, execution="simulated"),
        fb.eff_v2("tiny-gpt2", fb.method("cast"), REG, 1.5, 40.0),
        fb.ppl_record("tiny-gpt2", fb.method("cast"), [3.01] * 4),
    ]
    out = report(tmp_path, recs, plots=True, html=True)
    df = pd.read_csv(out.folder / "leaderboard.csv", keep_default_na=False)
    assert not [c for c in df.columns if c.endswith(" flag")] and set(df["timing flags"]) == {""}
    assert "(noisy)" not in out.summary and (out.folder / "report.html").exists()


def test_memory_plots_carry_no_flags_and_flagged_timings_stay_off_frontiers(tmp_path):
    lb = board(tmp_path, one_regime_records())
    plots = write_plots(lb, tmp_path / "plots")
    latency = next(p for p in plots if p.axis.col.startswith("decode ms/token"))
    memory = next(p for p in plots if p.axis.col.startswith("peak mem"))
    flagged = {pt.label: pt.flag for pt in latency.points if pt.flag}
    assert flagged == {"cast(bfloat16)": "noisy", "svd(ratio=0.2)": "under-sampled"}
    assert not [pt for pt in latency.points if pt.flag and pt.on_front]
    assert any("noisy" in e for e in latency.legend)
    assert not [pt for pt in memory.points if pt.flag]
    assert not [e for e in memory.legend if "noisy" in e or "under-sampled" in e]


def test_a_plot_with_nothing_trusted_is_greyed_with_a_banner(tmp_path):
    recs = one_regime_records()
    for r in recs:
        if r["task"]["name"] == "efficiency":
            r["task_details"].update(noisy=True, noise_reasons=["other processes took 0.9 cores"])
    plots = write_plots(board(tmp_path, recs), tmp_path / "plots")
    timing = [p for p in plots if p.axis.col.startswith(("decode ms/token", "TTFT"))]
    assert timing and all("noisy" in p.greyed for p in timing)
    assert all(not any(pt.on_front for pt in p.points) for p in timing)
    assert not [e for p in timing for e in p.legend if e in ("native", "Pareto frontier")]
    size = next(p for p in plots if p.axis.col == "stored MB")
    assert not size.greyed  # sizes are not timings
    # every method simulated: the timing shows nothing but the dense model
    sims = [fb.ppl_record("m", fb.method("baseline"), [2.0] * 4), fb.eff_v2("m", fb.method("baseline"), REG, 1, 50)]
    for name in ("rtn", "magnitude"):
        sims += [
            fb.ppl_record("m", fb.method(name), [2.2] * 4, execution="simulated"),
            fb.eff_v2("m", fb.method(name), REG, 1.02, 50, execution="simulated"),
        ]
    lat = next(p for p in write_plots(board(tmp_path / "s", sims), tmp_path / "p2") if p.axis.speed)
    assert "simulated" in lat.greyed


def test_legend_lists_only_what_is_drawn(tmp_path):
    recs = [
        fb.ppl_record("m", fb.method("baseline"), [2.0] * 4),
        fb.ppl_record("m", fb.method("cast"), [2.01] * 4, report={"stored_bytes": 6e6}),
    ]
    (size,) = write_plots(board(tmp_path, recs), tmp_path / "plots")
    assert size.legend == ["baseline (dotted: its quality)", "native", "Pareto frontier"]
    assert not [e for e in size.legend if "simulated" in e or "noisy" in e]


def test_log_axis_ticks_are_plain_numbers(tmp_path):
    recs = [
        fb.ppl_record("m", fb.method("baseline"), [3.6] * 4),
        fb.ppl_record("m", fb.method("rtn", {"bits": 2}), [6.2] * 4, report={"stored_bytes": 2e6}),
        fb.ppl_record("m", fb.method("rtn", {"bits": 3}), [4.3] * 4, report={"stored_bytes": 3e6}),
    ]
    (plot,) = write_plots(board(tmp_path, recs), tmp_path / "plots")  # perplexity 37 to 493: log scale
    assert plot.log_y and plot.yticks
    for t in plot.yticks:
        assert "×" not in t and "$" not in t and "^" not in t and "e" not in t, plot.yticks
        float(t.replace(",", ""))  # a plain number


def crosses(box, seg) -> bool:
    """Independent check: does the segment pass through the box (Liang-Barsky clipping)?"""
    x, y, w, h = box
    x0, y0, x1, y1 = seg
    t0, t1 = 0.0, 1.0
    dx, dy = x1 - x0, y1 - y0
    for p, q in ((-dx, x0 - x), (dx, x + w - x0), (-dy, y0 - y), (dy, y + h - y0)):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    return True


def test_labels_are_not_crossed_by_the_frontier(tmp_path):
    recs = [fb.ppl_record("m", fb.method("baseline"), [2.0] * 4)]
    for k, (nll, size) in enumerate([(2.6, 2e6), (2.3, 4e6), (2.12, 7e6), (2.05, 10e6), (2.5, 2.5e6), (2.2, 5e6)]):
        recs.append(
            fb.ppl_record("m", fb.method("rtn", {"bits": 2 + k}), [nll] * 4, report={"stored_bytes": size + k * 1e5})
        )
    (plot,) = write_plots(board(tmp_path, recs), tmp_path / "plots")
    assert len(plot.front_px) >= 3
    texts = [pt for pt in plot.points]
    boxes = plot.label_boxes
    assert len(boxes) == len(texts)
    hits = [(b, s) for b in boxes for s in plot.front_px if crosses(b, s)]
    assert not hits


def test_sparsity_of_a_quantizer_says_it_is_rounding(tmp_path):
    recs = [
        fb.ppl_record("m", fb.method("baseline"), [2.0] * 4),
        fb.ppl_record("m", fb.method("rtn"), [2.1] * 4, report={"sparsity": 0.133, "stored_bytes": 3e6}),
        fb.ppl_record("m", fb.method("magnitude"), [2.3] * 4, report={"sparsity": 0.5}),
    ]
    out = report(tmp_path, recs, plots=False)
    md = (out.folder / "leaderboard.md").read_text()
    rtn = next(line for line in md.splitlines() if line.startswith("| m | rtn"))
    mag = next(line for line in md.splitlines() if line.startswith("| m | magnitude"))
    assert "0.133 (rounded to zero)" in rtn and "rounded" not in mag
    df = pd.read_csv(io.StringIO((out.folder / "leaderboard.csv").read_text()), keep_default_na=False)
    assert df.set_index("method_name").loc["rtn", "sparsity note"] == "rounded to zero"
    assert math.isclose(df.set_index("method_name").loc["rtn", "sparsity"], 0.133)


def test_stored_family_wins_over_the_registry(tmp_path):
    plug = fb.method("someone-elses-pruner")
    plug["family"] = "pruning"
    plug["families"] = ["pruning"]
    recs = [fb.ppl_record("m", fb.method("baseline"), [2.0] * 4), fb.ppl_record("m", plug, [2.2] * 4)]
    lb = board(tmp_path, recs)
    assert lb.df.set_index("method_name").loc["someone-elses-pruner", "family"] == "pruning"
    plug.pop("families")  # only the chain's family
    lb = board(tmp_path / "2", recs)
    assert lb.df.set_index("method_name").loc["someone-elses-pruner", "family"] == "pruning"


@pytest.mark.parametrize("metric", ["decode_roofline_fraction"])
def test_roofline_fraction_shows_its_denominator(tmp_path, metric):
    recs = one_regime_records()
    for r in recs:
        if r["task"]["name"] == "efficiency":
            r["task_details"]["roofline"] = {
                "denominators": {"decode": {"bytes_per_s": 45.9e9, "working_set_bytes": 512 * 2**20}}
            }
    out = report(tmp_path, recs, plots=False)
    df = pd.read_csv(out.folder / "leaderboard.csv", keep_default_na=False)
    assert set(df["decode roofline of"]) >= {"of 45.9 GB/s at 512 MiB"}


def test_an_edited_quality_value_gets_no_noise_interval_in_the_leaderboard(tmp_path):
    base = fb.ppl_record("m", fb.method("baseline"), [2.0 + 0.01 * i for i in range(8)])
    edited = fb.ppl_record("m", fb.method("rtn"), [2.0 + 0.01 * i for i in range(8)], report={"stored_bytes": 3e6})
    edited["metrics"]["perplexity"]["value"] *= 1.49
    out = report(tmp_path, [base, edited], plots=False)
    md = (out.folder / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| m | rtn"))
    assert "no interval: perplexity contradicts its per-example data" in row.replace("\\", "")
    assert "≈ noise" not in row


def test_a_plugin_tasks_quality_metric_comes_from_the_record(tmp_path):
    task = {"name": "someone-elses-task", "version": "1", "params": {}, "provider": "plugin==1.0"}
    recs = []
    for name, score in (("baseline", 0.7), ("rtn", 0.6)):
        r = fb.record("m", fb.method(name), task, {"score": fb.m(score, "fraction", True)})
        r["task_info"] = {"quality_metric": "score", "paired_metric": None, "timed": False}
        recs.append(r)
    lb = board(tmp_path, recs)
    (q,) = lb.quality
    assert q.metric == "score" and q.higher_better
    assert lb.df.set_index("method_name").loc["rtn", q.delta] == pytest.approx(-0.1)


def test_how_the_timings_were_taken_is_said_once_per_group(tmp_path):
    recs = one_regime_records()
    labels_ = {
        "baseline": "baseline",
        "cast": "cast(bfloat16)",
        "svd": "svd(ratio=0.2)",
        "rtn": "rtn(8-bit, per-channel)",
    }
    for r in recs:
        if r["task"]["name"] != "efficiency":
            continue
        name = r["method"]["name"]
        if name == "svd":
            r["task_details"]["interleaving"] = {"interleaved": False, "reason": "another worker"}
        else:
            others = [v for k, v in labels_.items() if k not in (name, "svd")]
            r["task_details"]["interleaving"] = {
                "interleaved": True,
                "labels": others,
                "with": ["x"] * len(others),
                "rounds": 8,
                "order": "A B C, C B A",
            }
    out = report(tmp_path, recs, plots=False, html=True)
    md = (out.folder / "leaderboard.md").read_text().replace("\\", "")
    notes = md.split("Timings:")[1].split("\n\n")[1].splitlines()
    assert notes == [
        "- [b1 p128 n32] interleaved: baseline, cast(bfloat16), rtn(8-bit, per-channel) (8 rounds, A B C, C B A)",
        "- [b1 p128 n32] measured alone: another worker: svd(ratio=0.2)",
    ]
    assert "measured alone: another worker" in (out.folder / "report.html").read_text()
