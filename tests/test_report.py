"""Reports from fabricated records: escaping, latest state, several folders, labels, plots, formats."""

from __future__ import annotations

import io
import json
import warnings

import fabricate as fb
import pandas as pd
import pytest

from slimbench.cli import main
from slimbench.report.escape import csv_text, latex_text, md_text
from slimbench.report.plots import Point, pareto_front
from slimbench.report.write import write_report
from slimbench.specs import StepSpec
from slimbench.sweep.store import ResultStore


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path / "results")
    fb.write(s, fb.suite_records())
    return s


def report(stores, tmp_path, plots=False, **kw):
    """The report without plots unless asked (plots are tested on their own, and cost seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_report(stores, tmp_path / "report", plots=plots, **kw)


# -- labels ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "label"),
    [
        ("rtn", {}, "rtn(4-bit, per-channel)"),  # the defaults a reader needs, spelled out
        ("rtn", {"group_size": 32}, "rtn(4-bit, g32)"),
        ("magnitude", {}, "magnitude(50% sparse)"),
        ("gptq", {"bits": 3, "act_order": True}, "gptq(3-bit, per-channel, act_order=True)"),
        ("cast", {}, "cast(bfloat16)"),
        ("baseline", {}, "baseline"),
        # key settings that depend on another: a static cache has no bits to show
        ("kv-cache", {"implementation": "static"}, "kv-cache(implementation=static)"),
        ("kv-cache", {"implementation": "quantized"}, "kv-cache(implementation=quantized, 8-bit)"),
    ],
)
def test_labels_show_key_settings_even_at_defaults(name, params, label):
    assert StepSpec(name=name, params=params).label() == label


def test_report_relabels_old_records_from_their_settings(store, tmp_path):
    # the fabricated rtn record stores the old label "rtn(group_size=32)"
    df = pd.read_csv(report(store, tmp_path).folder / "leaderboard.csv")
    assert "rtn(4-bit, g32)" in set(df["method"]) and "rtn(group_size=32)" not in set(df["method"])


# -- escaping -------------------------------------------------------------------------------
def hostile_store(tmp_path):
    s = ResultStore(tmp_path / "hostile")
    model = "![x](http://evil.example/x.png)"
    task = json.loads(json.dumps(fb.PPL_TASK))
    recs = [
        fb.ppl_record(model, fb.method("baseline"), [2.0] * 4),
        fb.ppl_record(model, fb.method("evil", label='=HYPERLINK("http://x")'), [2.1] * 4),
    ]
    task2 = {**task, "params": {**task["params"], "corpus": "<img src=x onerror=alert(1)>"}}
    r = fb.ppl_record(model, fb.method("baseline"), [2.0] * 4)
    r["task"] = task2
    r["run_id"] = "other-task"
    recs.append(r)
    for m in ("+cmd", "-2+3", "@SUM(A1)", "\tx"):
        recs.append(fb.ppl_record(m, fb.method("baseline"), [2.0] * 4))
    fb.write(s, recs)
    return s


def test_markdown_escapes_headers_and_cells(tmp_path):
    out = report(hostile_store(tmp_path), tmp_path)
    md = (out.folder / "leaderboard.md").read_text()
    assert "<img" not in md  # the task parameter lands in a header: escaped
    assert "![x](" not in md and r"\!\[x\]" in md  # the model folder name stays text, not an image
    assert "&lt;img src=x onerror=alert(1)&gt;" in md


def test_md_text_neutralises_markdown_and_html():
    assert md_text("a|b") == r"a\|b"
    assert md_text("**b** _i_ `c` <b>") == r"\*\*b\*\* \_i\_ \`c\` &lt;b&gt;"
    assert md_text("line\nbreak") == "line break"


def test_csv_neutralises_formulas(tmp_path):
    out = report(hostile_store(tmp_path), tmp_path)
    df = pd.read_csv(out.folder / "leaderboard.csv", keep_default_na=False)
    models, methods = set(df["model"]), set(df["method"])
    assert {"'+cmd", "'-2+3", "'@SUM(A1)", "'\tx"} <= models
    assert '\'=HYPERLINK("http://x")' in methods
    risky = [c for c in df.astype(str).stack() if c and (c[0] in "=+@\t\r" or (c[0] == "-" and not c[1:2].isdigit()))]
    assert not risky
    assert csv_text(-1.5) == -1.5  # numbers are never touched


def test_latex_escapes_and_captions(store, tmp_path):
    tex = (report(store, tmp_path).folder / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    caption = next(line for line in tex.splitlines() if line.startswith(r"\caption"))
    assert "shakespeare test, seqlen 64, 8 windows of 40" in caption and "Test CPU 9000" in caption
    assert r"\textless{}script\textgreater{}alert(1)\textless{}/script\textgreater{}" in tex
    assert "<script>" not in tex
    assert latex_text("a_b & 50% $x$ #{}~^\\") == (
        r"a\_b \& 50\% \$x\$ \#\{\}\textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


# -- which records ----------------------------------------------------------------------------
def test_only_latest_state_of_each_cell(tmp_path):
    s = ResultStore(tmp_path / "r")
    ok = fb.ppl_record("tiny-llama", fb.method("baseline"), [2.0] * 4)
    fixed = fb.ppl_record("tiny-llama", fb.method("rtn"), [2.1] * 4)
    err = {"stage": "task", "type": "RuntimeError", "message": "transient failure", "traceback": ""}
    still = fb.ppl_record("tiny-llama", fb.method("magnitude"), [2.1] * 4)
    s.write({**fixed, "status": "failed", "error": err, "finished_at": "2026-01-01T00:00:00Z"})
    s.write(fixed)  # the same cell, later ok
    s.write({**still, "status": "failed", "error": {**err, "message": "still broken"}})
    s.write(ok)
    out = report(s, tmp_path, html=True)
    md = (out.folder / "leaderboard.md").read_text()
    assert "transient failure" not in md and "still broken" in md
    assert "transient failure" not in (out.folder / "report.html").read_text()
    assert len(pd.read_csv(out.folder / "leaderboard.csv")) == 2


def test_several_results_folders_merge_and_deduplicate(store, tmp_path):
    other = ResultStore(tmp_path / "other")
    fb.write(other, fb.suite_records()[:3])  # the same cells, copied: counted once
    fb.write(other, [fb.ppl_record("tiny-gpt2", fb.method("baseline"), [3.0] * 8)])
    out = report([store, other], tmp_path)
    df = pd.read_csv(out.folder / "leaderboard.csv")
    assert set(df["model"]) == {"tiny-llama", "tiny-gpt2"}
    assert len(df) == len(fb.methods()) + 1  # no row twice
    assert out.summary.count("tiny-gpt2") == 1


def test_cli_report_takes_several_results_folders(store, tmp_path, capsys):
    other = ResultStore(tmp_path / "other")
    fb.write(other, [fb.ppl_record("tiny-gpt2", fb.method("baseline"), [3.0] * 8)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(
            [
                "report",
                "--results",
                str(store.root),
                "--results",
                str(other.root),
                "--out",
                str(tmp_path / "o"),
                "--html",
            ]
        )
    assert rc == 0
    df = pd.read_csv(tmp_path / "o" / "leaderboard.csv")
    assert {"tiny-llama", "tiny-gpt2"} <= set(df["model"])  # neither folder silently dropped
    assert (tmp_path / "o" / "report.html").exists()


def test_unreadable_record_files_are_skipped_and_named(store, tmp_path, capsys):
    bad = {
        "truncated.json": '{"run_id": "abc", "status": "o',
        "list.json": "[1, 2]",
        "foreign.json": '{"hello": "world"}',
        "half.json": '{"run_id": "x", "status": "ok", "model": 3}',
    }
    for name, text in bad.items():
        (store.runs / name).write_text(text)
    out = write_report(store, tmp_path / "report")
    warned = capsys.readouterr().err
    for name in bad:  # one warning naming each file, and each listed in the report
        assert f"{name}:" in warned
        assert name in out.summary and name in (out.folder / "leaderboard.md").read_text()
        # said as "path: reason", never as a Python tuple
        assert f"skipped {store.runs / name}: " in out.summary
    assert "PosixPath" not in out.summary
    assert len(pd.read_csv(out.folder / "leaderboard.csv")) == len(fb.methods())


# -- leaderboard contents ---------------------------------------------------------------------
def test_efficiency_v2_columns_regimes_and_noisy_marks(store, tmp_path):
    out = report(store, tmp_path)
    df = pd.read_csv(out.folder / "leaderboard.csv", keep_default_na=False)
    for col in (
        "TTFT ms [b1 p128 n32]",
        "ITL p99 ms [b8 p128 n32]",
        "e2e tok/s [b1 p2048 n32]",
        "KV physical MB [b8 p128 n32]",
        "decode roofline [b1 p128 n32]",
        "weights MiB [b1 p128 n32]",
    ):
        assert col in df
    row = df.set_index("method").loc["cast(bfloat16)"]
    assert "b8 p128 n32" in row["timing flags"] and "spread of repeats" in row["timing flags"]
    assert df.set_index("method").loc["baseline", "timing flags"] == ""
    md = (out.folder / "leaderboard.md").read_text()
    assert "| timing flags |" in md.split("\n## ")[1].splitlines()[6]  # the flags column in the Markdown table
    tex = (out.folder / "leaderboard.tex").read_text()
    assert "noisy" in next(line for line in tex.splitlines() if line.startswith("tiny-llama & cast"))


def test_v1_efficiency_records_still_report(tmp_path):
    s = ResultStore(tmp_path / "v1")
    fb.write(
        s,
        [
            fb.ppl_record("tiny-gpt2", fb.method("baseline"), [3.0] * 4),
            fb.ppl_record("tiny-gpt2", fb.method("rtn"), [3.1] * 4, execution="simulated"),
            fb.eff_v1("tiny-gpt2", fb.method("baseline"), 500, 600),
            fb.eff_v1("tiny-gpt2", fb.method("rtn"), 480, 610, execution="simulated"),
        ],
    )
    out = report(s, tmp_path, plots=True)
    df = pd.read_csv(out.folder / "leaderboard.csv")
    assert {"prefill ms", "decode tok/s", "peak mem MiB", "decode ms/token"} <= set(df.columns)
    assert df.set_index("method_name").loc["baseline", "decode ms/token"] == pytest.approx(2.0)
    assert len([p for p in out.files if p.suffix == ".png"]) == 4  # size, decode latency, prefill, memory


def test_noise_unit_protocol_and_warnings_are_visible(store, tmp_path):
    out = report(store, tmp_path)
    md = (out.folder / "leaderboard.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "paired Δ nll, nats/token, 95% CI" in header
    assert "nats/token" in next(
        line for line in md.splitlines() if line.startswith("| tiny\\-llama") or line.startswith("| tiny-llama | rtn")
    )
    protocol = next(line for line in md.splitlines() if line.startswith("| perplexity@"))
    for part in ("shakespeare test", "seqlen 64", "8 windows of 40"):
        assert part in protocol
    assert "rank\\-deficient Hessian" in md or "rank-deficient Hessian" in md  # the method's own warning


# -- plots ------------------------------------------------------------------------------------
def test_pareto_front_respects_both_directions():
    xs, ys = [1.0, 2.0, 3.0, 4.0], [10.0, 8.0, 9.0, 5.0]
    assert pareto_front(xs, ys, higher_y_better=False) == [0, 1, 3]
    assert pareto_front(xs, ys, higher_y_better=False, higher_x_better=True) == [3]


def rendered(tmp_path, recs):
    s = ResultStore(tmp_path / "p")
    fb.write(s, recs)
    from slimbench.report import records, table
    from slimbench.report.plots import write_plots

    lb = table.build(records.load(s).ok)
    return lb, write_plots(lb, tmp_path / "plots")


def test_simulated_points_drawn_but_off_latency_and_memory_frontiers(tmp_path):
    recs = fb.suite_records()
    _lb, plots = rendered(tmp_path, recs)
    speed = [p for p in plots if p.axis.speed]
    size = next(p for p in plots if p.axis.col == "stored MB")
    assert speed and all(any(pt.simulated for pt in p.points) for p in speed)  # drawn
    assert not [pt for p in speed for pt in p.points if pt.simulated and pt.on_front]
    # on the size axis the stored bytes are real: rtn 4-bit is on that frontier
    assert any(pt.on_front and pt.simulated for pt in size.points)


def test_regime_plots_latency_throughput_ttft(tmp_path):
    _, plots = rendered(tmp_path, fb.suite_records())
    words = [p.axis.words for p in plots]
    assert any(w.startswith("decode latency") and "batch 1, 128-token prompt" in w for w in words)
    assert any(w.startswith("decode throughput") and "batch 8" in w for w in words)
    assert any(w.startswith("time to first token") and "2048-token prompt" in w for w in words)
    for p in plots:  # protocol and hardware in every title, units on the axes
        assert "seqlen 64" in p.title and "Test CPU 9000" in p.title
        assert "(" in p.axis.words and p.axis.words.endswith(")")


def test_baseline_marked_and_noisy_points_flagged(tmp_path):
    _, plots = rendered(tmp_path, fb.suite_records())
    assert all(sum(pt.baseline for pt in p.points) == 1 for p in plots)
    b8 = next(p for p in plots if "batch 8" in p.axis.words and p.axis.col.startswith("decode tok/s"))
    assert [pt.label for pt in b8.points if pt.noisy] == ["cast(bfloat16)"]


def test_log_scale_when_perplexity_spans_more_than_10x(tmp_path):
    wide = [
        fb.ppl_record("m", fb.method("baseline"), [2.0] * 4),
        fb.ppl_record("m", fb.method("rtn", {"bits": 2}), [4.8] * 4, report={"stored_bytes": 2e6}),
    ]
    _, plots = rendered(tmp_path, wide)  # exp(2) = 7.4 vs exp(4.8) = 121: 16x
    assert plots[0].log_y
    narrow = [
        fb.ppl_record("m", fb.method("baseline"), [2.0] * 4),
        fb.ppl_record("m", fb.method("rtn"), [2.5] * 4, report={"stored_bytes": 2e6}),
    ]
    _, plots = rendered(tmp_path / "n", narrow)
    assert not plots[0].log_y


def test_labels_do_not_overlap(tmp_path):
    recs = [fb.ppl_record("m", fb.method("baseline"), [2.0] * 4)]
    for k in range(12):  # twelve methods crowded at nearly the same spot
        recs.append(
            fb.ppl_record(
                "m",
                fb.method("magnitude", {"sparsity": round(0.3 + 0.01 * k, 2)}),
                [2.3 + 0.001 * k] * 4,
                report={"stored_bytes": 5e6 + 1e3 * k},
            )
        )
    _, plots = rendered(tmp_path, recs)
    boxes = plots[0].label_boxes
    assert len(boxes) == 13
    for i, (x0, y0, w0, h0) in enumerate(boxes):
        for x1, y1, w1, h1 in boxes[i + 1 :]:
            assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0
    assert plots[0].key  # the ones without room are numbered and explained in the legend
    assert all(f"{n}: " for n, _ in plots[0].key)


def test_plot_files_collision_free_and_dollar_safe(tmp_path):
    long = "/data/models/" + "very-long-organisation-name/" * 4
    recs = []
    for model in (long + "model-a", long + "model-b", "cost$\\alpha$_$x"):
        recs += [
            fb.ppl_record(model, fb.method("baseline"), [2.0] * 4),
            fb.ppl_record(model, fb.method("rtn"), [2.2] * 4, report={"stored_bytes": 3e6}),
        ]
    _, plots = rendered(tmp_path, recs)
    assert len({p.path for p in plots}) == len(plots) == 3
    dollar = next(p for p in plots if "$" in p.model)
    assert "cost$\\alpha$_$x" in dollar.title  # shown literally
    assert dollar.path.read_bytes()[:4] == b"\x89PNG"


def test_point_positions_fall_inside_the_image(tmp_path):
    _, plots = rendered(tmp_path, fb.suite_records())
    for p in plots:
        assert all(isinstance(pt, Point) and 0 < pt.px < p.width and 0 < pt.py < p.height for pt in p.points)


# -- HTML (static checks; the browser test drives it for real) ---------------------------------
def test_html_is_self_contained_and_escaped(store, tmp_path):
    fail = fb.record(
        "tiny-llama",
        fb.method("awq"),
        fb.PPL_TASK,
        {},
        status="failed",
        error={
            "stage": "method",
            "type": "ValueError",
            "message": "bad <img src=x onerror=alert(2)>",
            "traceback": "Traceback\nValueError",
        },
    )
    store.write(fail)
    page = (report(store, tmp_path, html=True, plots=True).folder / "report.html").read_text()
    assert fb.SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "bad &lt;img src=x onerror=alert(2)&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert page.count("<script") == 1 and "data:image/png;base64," in page
    assert "Content-Security-Policy" in page
    assert 'id="failed"' in page and "rank-deficient Hessian" in page
    assert 'class="badge simulated"' in page and 'class="badge flagged">noisy' in page


def test_empty_store_reports_no_records(tmp_path):
    s = ResultStore(tmp_path / "empty")
    s.runs.mkdir(parents=True)
    out = report(s, tmp_path, html=True)
    assert "No ok records" in (out.folder / "leaderboard.md").read_text()
    assert "No ok records" in (out.folder / "report.html").read_text()


def test_csv_round_trips_numbers(store, tmp_path):
    text = (report(store, tmp_path).folder / "leaderboard.csv").read_text()
    df = pd.read_csv(io.StringIO(text))
    col = "Δ perplexity@concat-windows/1"
    assert (df.set_index("method_name").loc["baseline", col] == 0).all()
