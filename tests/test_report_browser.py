"""The HTML report in a real headless browser (Debian's Chromium driven by Playwright).

Loads without console errors, sorts on a header click, hides rows with a filter (each model's
baseline stays), keeps the model and method columns in view when the table scrolls sideways,
fits a 1,364-pixel view, shows and hides plots with the model filter and says when a filter
cannot redraw them, lists overlapping points together, greys a plot of untrusted timings with a
banner, shows a hostile method label as text without running it, and leaves a screenshot; the
comparison page sorts and filters. Without Chromium the test is skipped locally and fails in CI
(CI=true), where the set-up installs it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import fabricate as fb
import pytest

from slimbench.report.write import write_report
from slimbench.sweep.store import ResultStore

# One test worker for the file (make test runs pytest-xdist with --dist loadgroup): its tests share
# the module's report and its one Chromium, which each worker would otherwise build again.
pytestmark = pytest.mark.xdist_group("test_report_browser")

# Flags for a root, offline machine: no sandbox (root), no background connections that a
# closed network would refuse, a fresh profile.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


def chromium() -> str:
    path = os.environ.get("SLIMBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing in CI: the set-up (make browser) installs Debian's chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")


SAME_SPOT = {"stored_bytes": 4e6, "effective_bits": 4.5}
VIEW = {"width": 1364, "height": 900}  # a common laptop view


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    store = ResultStore(tmp / "results")
    recs = [
        *fb.suite_records(),
        fb.ppl_record("tiny-gpt2", fb.method("baseline"), [3.0] * 8),
        fb.ppl_record("tiny-gpt2", fb.method("rtn"), [3.3] * 8, execution="simulated", report=SAME_SPOT),
        # another method at exactly the same size and quality: both must stay reachable
        fb.ppl_record("tiny-gpt2", fb.method("gptq", {"bits": 4}), [3.3] * 8, execution="simulated", report=SAME_SPOT),
    ]
    long_path = "/data/models/" + "very-long-organisation-name/" * 6 + "model-without-spaces"  # no break point
    recs += [
        fb.ppl_record(long_path, fb.method("baseline"), [3.0] * 8),
        fb.ppl_record(long_path, fb.method("rtn"), [3.2] * 8, execution="simulated", report=SAME_SPOT),
    ]
    for r in recs:  # every timing of the long-prompt regime taken on a busy machine: its plots are greyed
        if r["task"]["name"] == "efficiency" and r["task"]["params"]["prompt_len"] == 2048:
            r["task_details"].update(noisy=True, noise_reasons=["other processes took 0.9 cores"])
    fail = fb.record(
        "tiny-llama",
        fb.method("awq"),
        fb.PPL_TASK,
        {},
        status="failed",
        error={
            "stage": "method",
            "type": "ValueError",
            "message": "<img src=x onerror=alert(2)>",
            "traceback": "Traceback",
        },
    )
    fb.write(store, [*recs, fail])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(store, tmp / "report", html=True)
    return tmp / "report" / "report.html"


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    exe = chromium()
    with playwright.sync_playwright() as p:  # one Playwright per module: a second would clash with it
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def browser_page(page_file, browser):
    events: dict[str, list[str]] = {"errors": [], "dialogs": []}
    page = browser.new_page(viewport=VIEW)
    page.on("console", lambda m: m.type in ("error", "warning") and events["errors"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: events["errors"].append(f"pageerror: {e}"))
    page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
    page.goto(page_file.as_uri())
    page.wait_for_load_state("load")
    yield page, events
    page.close()


def column_values(page, col: int) -> list[str]:
    return page.eval_on_selector_all(
        "table.lb tbody tr:not([hidden])", f"rows => rows.map(r => r.cells[{col}].getAttribute('data-v'))"
    )


def test_loads_without_console_errors_or_alerts(browser_page):
    page, events = browser_page
    assert page.title() == "SlimBench report"
    assert events["errors"] == [] and events["dialogs"] == []


def test_hostile_label_is_shown_as_text(browser_page):
    page, events = browser_page
    cell = page.locator("table.lb td.method", has_text=fb.SCRIPT)
    assert cell.count() == 1 and fb.SCRIPT in cell.inner_text()
    assert page.locator("#failed td", has_text="<img src=x onerror=alert(2)>").count() == 1
    assert events["dialogs"] == []


def test_header_click_sorts_rows(browser_page):
    page, _ = browser_page
    table = page.locator("table.lb").first
    header = table.locator("th", has_text="perplexity@concat-windows/1").first
    col = header.evaluate("th => Array.prototype.indexOf.call(th.parentNode.children, th)")
    header.click()
    up = [
        float(v)
        for v in table.evaluate(f"t => Array.from(t.tBodies[0].rows).map(r => r.cells[{col}].getAttribute('data-v'))")
        if v
    ]
    assert up == sorted(up) and len(up) >= 8
    header.click()
    down = [
        float(v)
        for v in table.evaluate(f"t => Array.from(t.tBodies[0].rows).map(r => r.cells[{col}].getAttribute('data-v'))")
        if v
    ]
    assert down == sorted(up, reverse=True)
    assert header.get_attribute("aria-sort") == "descending"


def test_filter_hides_rows(browser_page):
    page, _ = browser_page
    rows = page.locator("table.lb tbody tr")
    total = rows.count()
    page.select_option("select[data-filter=execution]", "simulated")
    visible = page.locator("table.lb tbody tr:not([hidden]):not(.baseline)")  # baselines stay: the reference
    assert 0 < visible.count() < total
    assert all(t == "simulated" for t in visible.locator("td .badge").all_inner_texts() if t in ("native", "simulated"))
    page.select_option("select[data-filter=execution]", "")
    page.select_option("select[data-filter=model]", "tiny-gpt2")
    assert page.locator("table.lb tbody tr:not([hidden])").count() == 3
    page.select_option("select[data-filter=model]", "")
    assert page.locator("table.lb tbody tr:not([hidden])").count() == total


def test_details_open_from_a_link_and_screenshot(browser_page, tmp_path):
    page, events = browser_page
    page.locator("table.lb td.method a").first.click()
    target = page.evaluate("location.hash").lstrip("#")
    assert page.locator(f"details#{target}").evaluate("d => d.open")
    assert page.locator("map area").count() > 0  # hover areas over the plot points
    page.evaluate("window.scrollTo(0, 0)")
    shot = Path(os.environ.get("SLIMBENCH_SCREENSHOT") or tmp_path / "report.png")
    page.screenshot(path=str(shot), full_page=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert events["errors"] == [] and events["dialogs"] == []


def visible_rows(page) -> list[str]:
    return page.eval_on_selector_all(
        "table.lb tbody tr:not([hidden])", "rows => rows.map(r => r.cells[0].innerText + ' | ' + r.cells[1].innerText)"
    )


def reset_filters(page) -> None:
    for name in ("model", "family", "execution", "task"):
        page.select_option(f"select[data-filter={name}]", "")


def test_page_fits_a_1364_pixel_view(browser_page):
    page, _ = browser_page
    page.evaluate("window.scrollTo(0, 0)")
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEW["width"]
    page.check("#allcols")  # every efficiency column: the table scrolls inside its box, the page does not
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEW["width"]
    page.uncheck("#allcols")


def test_model_and_method_columns_stay_in_view_when_the_table_scrolls(browser_page):
    page, _ = browser_page
    page.check("#allcols")
    wrap = page.locator(".wrap").first
    assert wrap.evaluate("w => w.scrollWidth > w.clientWidth")  # wide enough to scroll
    header = wrap.locator("th", has_text="decode tok/s [b8 p128 n32]").first
    header.click()  # sort by a timing column, then scroll to it
    wrap.evaluate("w => { w.scrollLeft = w.scrollWidth; }")
    box = wrap.evaluate("w => w.getBoundingClientRect().left")
    first = wrap.locator("tbody tr").first
    model = first.locator("td").nth(0).bounding_box()
    method = first.locator("td").nth(1).bounding_box()
    assert abs(model["x"] - box) < 2  # still at the left edge
    assert abs(method["x"] - (model["x"] + model["width"])) < 2  # right beside it
    top = page.evaluate(
        "(() => { const c = document.querySelector('table.lb tbody tr td:nth-child(2)');"
        " const r = c.getBoundingClientRect();"
        " return document.elementFromPoint(r.left + 5, r.top + 5).closest('td') === c; })()"
    )
    assert top  # drawn over the scrolled cells, not under them
    page.uncheck("#allcols")
    wrap.evaluate("w => { w.scrollLeft = 0; }")


def test_baseline_rows_stay_under_every_filter_but_the_model_filter(browser_page):
    page, _ = browser_page
    reset_filters(page)
    page.select_option("select[data-filter=family]", "pruning")
    rows = visible_rows(page)
    assert "tiny-llama | baseline details" in [r.replace("\n", " ") for r in rows] or any(
        r.startswith("tiny-llama | baseline") for r in rows
    )
    assert any(r.startswith("tiny-gpt2 | baseline") for r in rows)
    assert any("magnitude" in r for r in rows) and not any("rtn" in r for r in rows)
    page.select_option("select[data-filter=execution]", "simulated")
    assert sum(r.split(" | ")[1].startswith("baseline") for r in visible_rows(page)) == 3  # one per model
    reset_filters(page)
    page.select_option("select[data-filter=model]", "tiny-gpt2")
    assert all(r.startswith("tiny-gpt2") for r in visible_rows(page))
    reset_filters(page)


def test_plots_follow_the_model_filter_and_say_when_a_filter_cannot_redraw_them(browser_page):
    page, _ = browser_page
    reset_filters(page)
    figures = page.locator("#plots figure")
    total = figures.count()
    page.select_option("select[data-filter=model]", "tiny-gpt2")
    shown = page.locator("#plots figure:not([hidden])")
    assert 0 < shown.count() < total
    assert all("tiny-gpt2" in t for t in shown.evaluate_all("fs => fs.map(f => f.getAttribute('data-model'))"))
    assert not page.locator("#plotnote").is_visible()
    reset_filters(page)
    page.select_option("select[data-filter=family]", "pruning")
    assert page.locator("#plotnote").is_visible() and "family" in page.locator("#plotnote").inner_text()
    listed = page.locator("#plots figure li:not([hidden])").all_inner_texts()
    assert listed and not [t for t in listed if t.startswith("rtn") or t.startswith("gptq")]
    reset_filters(page)
    assert not page.locator("#plotnote").is_visible()


def test_overlapping_points_are_listed_together(browser_page):
    page, _ = browser_page
    titles = page.eval_on_selector_all("map area", "as => as.map(a => a.getAttribute('title'))")
    both = [t for t in titles if t.startswith("2 points here")]
    assert both and "rtn(4-bit, per-channel)" in both[0] and "gptq(4-bit, per-channel)" in both[0]


def test_a_plot_of_untrusted_timings_is_greyed_with_a_banner(browser_page):
    page, _ = browser_page
    greyed = page.locator("#plots figure.greyed")
    assert greyed.count() >= 2
    assert "every timing here is noisy" in greyed.first.locator(".banner").inner_text()
    assert page.locator("#plots figure.plot").count() > 0  # the others are drawn normally


def test_compare_page_sorts_and_filters(tmp_path, browser):
    import fabricate as fb_

    from slimbench.cli import main

    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    base = [2.0 + 0.05 * (i % 5) for i in range(20)]
    for k, shift in enumerate((0.05, -0.03, 0.0, 0.02)):
        meth = fb_.method("rtn", {"bits": 2 + k})
        fb_.write(a, [fb_.ppl_record("m", meth, base)])
        fb_.write(b, [fb_.ppl_record("m", meth, [x + shift + 0.001 * (i % 2) for i, x in enumerate(base)])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compare", str(a.root), str(b.root), "--out", str(tmp_path / "out")]) == 0
    page = browser.new_page(viewport=VIEW)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "out" / "compare.html").as_uri())
    rows = page.locator("#cmp tbody tr")
    total = rows.count()
    assert total >= 6
    page.select_option("#verdict", "worse")
    shown = page.locator("#cmp tbody tr:not([hidden])")
    assert 0 < shown.count() < total
    assert set(shown.evaluate_all("rs => rs.map(r => r.getAttribute('data-verdict'))")) == {"worse"}
    page.select_option("#verdict", "")
    page.fill("#q", "rtn(3-bit")
    cells = page.locator("#cmp tbody tr:not([hidden]) td.cell").all_inner_texts()
    assert len(cells) == 2 and all("rtn(3-bit" in t for t in cells)
    page.fill("#q", "")
    header = page.locator("#cmp th", has_text="Δ %")
    header.click()
    col = header.evaluate("th => Array.prototype.indexOf.call(th.parentNode.children, th)")
    values = page.eval_on_selector_all(
        "#cmp tbody tr", f"rs => rs.map(r => parseFloat(r.cells[{col}].getAttribute('data-v')))"
    )
    assert values == sorted(values)
    assert errors == []
    page.close()


def test_a_one_regime_leaderboard_fits_the_view_without_scrolling(tmp_path, browser):
    """The common report (a quality task and one efficiency regime, flags and noise included)
    needs no sideways scrolling at 1,364 pixels."""
    store = ResultStore(tmp_path / "r")
    recs = []
    for key, (meth, execution, shift, speed, rep) in fb.methods().items():
        recs.append(
            fb.ppl_record(
                "tiny-llama", meth, [2.0 + shift + 0.01 * i for i in range(8)], execution=execution, report=rep
            )
        )
        recs.append(
            fb.eff_v2(
                "tiny-llama",
                meth,
                (128, 32, 1),
                speed,
                50.0,
                noisy=key in ("cast", "svd"),
                execution=execution,
                report=rep,
            )
        )
    fb.write(store, recs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(store, tmp_path / "rep", html=True, plots=False)
    page = browser.new_page(viewport=VIEW)
    page.goto((tmp_path / "rep" / "report.html").as_uri())
    wrap = page.locator(".wrap").first
    assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth"), wrap.evaluate("w => [w.scrollWidth, w.clientWidth]")
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEW["width"]
    page.close()
