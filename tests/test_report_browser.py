"""The HTML report in a real headless browser (Debian's Chromium driven by Playwright).

Loads without console errors, sorts on a header click, hides rows with a filter, shows a
hostile method label as text without running it, and leaves a screenshot. Without Chromium
the test is skipped locally and fails in CI (CI=true), where the set-up installs it.
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


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    store = ResultStore(tmp / "results")
    recs = [
        *fb.suite_records(),
        fb.ppl_record("tiny-gpt2", fb.method("baseline"), [3.0] * 8),
        fb.ppl_record("tiny-gpt2", fb.method("rtn"), [3.3] * 8, execution="simulated"),
    ]
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
def browser_page(page_file):
    playwright = pytest.importorskip("playwright.sync_api")
    exe = chromium()
    events: dict[str, list[str]] = {"errors": [], "dialogs": []}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: m.type in ("error", "warning") and events["errors"].append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: events["errors"].append(f"pageerror: {e}"))
        page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        yield page, events
        browser.close()


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
    visible = page.locator("table.lb tbody tr:not([hidden])")
    assert 0 < visible.count() < total
    assert all(t == "simulated" for t in visible.locator("td .badge").all_inner_texts() if t in ("native", "simulated"))
    page.select_option("select[data-filter=execution]", "")
    page.select_option("select[data-filter=model]", "tiny-gpt2")
    assert page.locator("table.lb tbody tr:not([hidden])").count() == 2
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
