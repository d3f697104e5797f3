"""A comparison in words: a summary first, then the metrics that changed, most significant first.

Rows are sorted by verdict (worse beyond noise, better beyond noise, changed without a noise
estimate, not judged, inconsistent, within noise) and, within one verdict, by how far beyond
its noise the change is. Metrics equal on both sides are counted in the summary and left out
of the table (``all_rows=True`` keeps them). Every column is labelled; a timed metric that is
not a result says so in its own column. ``compare.html`` sorts by a clicked header and filters
by text and verdict.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter

from slimbench.report import labels
from slimbench.report.compare import Comparison, Delta, Pair, cell_name, signed
from slimbench.report.escape import html_text as h
from slimbench.report.escape import md_text
from slimbench.report.formatting import fmt
from slimbench.report.html_assets import COMPARE_JS

HEAD = ["cell", "hardware", "metric", "A", "B", "Δ (B - A)", "unit", "Δ %", "noise (95% CI of Δ)", "timing", "verdict"]
ORDER = {
    "worse": 0,
    "better": 1,
    "changed, no noise estimate": 2,
    "inconsistent record": 3,
    "within noise": 5,
    "identical": 6,
}


def rank(d: Delta) -> tuple[int, float]:
    return ORDER.get(d.verdict, 4), -d.significance  # "not judged: ..." between inconsistent and within noise


def noise_words(d: Delta) -> str:
    if d.inconsistent:
        return f"none: {d.inconsistent}"
    if d.noise is None:
        return f"no estimate ({d.no_noise_why})"
    verdict = "≈ within noise" if d.noise["within_noise"] else "beyond noise"
    return f"{verdict}: [{fmt(d.noise['ci_low'])}, {fmt(d.noise['ci_high'])}], {d.noise['how']}"


def rows(cmp: Comparison, all_rows: bool = False) -> list[tuple[Pair, Delta]]:
    """(pair, delta) in display order: by verdict, then significance; identical values left out."""
    out = [(p, d) for p in cmp.pairs for d in p.deltas if all_rows or d.verdict != "identical"]
    return sorted(out, key=lambda pd: (*rank(pd[1]), cell_name(pd[0].a), pd[1].metric))


def table_rows(cmp: Comparison, all_rows: bool = False) -> list[list[str]]:
    return [
        [
            cell_name(p.a),
            labels.hardware_key(p.a),
            d.metric,
            fmt(d.a),
            fmt(d.b),
            signed(d.delta),
            d.unit,
            signed(100 * d.relative) + "%" if math.isfinite(d.relative) else "–",
            noise_words(d),
            f"{d.flag}: {d.flag_why}" if d.flag else "",
            d.verdict,
        ]
        for p, d in rows(cmp, all_rows)
    ]


def summary(cmp: Comparison) -> list[str]:
    """The counts a reader wants before any table, one line each."""
    verdicts = Counter(d.verdict for p in cmp.pairs for d in p.deltas)
    not_judged = sum(n for v, n in verdicts.items() if v.startswith("not judged"))
    worse_cells = len({cell_name(p.a) for p in cmp.pairs for d in p.deltas if d.verdict == "worse"})
    return [
        f"{len(cmp.pairs)} cells compared: {verdicts['worse']} metric(s) worse beyond noise (in {worse_cells} "
        f"cell(s)), {verdicts['better']} better beyond noise, {verdicts['within noise']} within noise, "
        f"{verdicts['changed, no noise estimate']} changed without a noise estimate",
        f"{not_judged} timing(s) not judged (noisy or under-sampled: not results), "
        f"{verdicts['inconsistent record']} from a record that contradicts its own data",
        f"{verdicts['identical']} metric(s) identical on both sides (not listed)",
        f"only in A: {len(cmp.only_a)}; only in B: {len(cmp.only_b)}; not comparable: {len(cmp.not_comparable)}; "
        f"failed: {len(cmp.failed)}",
    ]


def markdown(cmp: Comparison, all_rows: bool = False) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(md_text(c) for c in cells) + " |"

    md = [
        "# SlimBench comparison",
        "",
        f"A: {', '.join(md_text(s) for s in cmp.sources[0])}  ",
        f"B: {', '.join(md_text(s) for s in cmp.sources[1])}",
        "",
        "## Summary",
        "",
        *[f"- {md_text(line)}" for line in summary(cmp)],
        "",
        "Only like with like: same model, method config and version, task version and parameters, and hardware "
        "class. Noise: paired bootstrap where per-example scores exist, else the spread of repeats. Rows: worse "
        "beyond noise first, then better, then the rest; most significant first.",
        "",
        f"## Compared cells ({len(cmp.pairs)})",
        "",
        row(HEAD),
        "|" + "---|" * len(HEAD),
    ]
    md += [row(r) for r in table_rows(cmp, all_rows)]
    for title, recs in (("Only in A", cmp.only_a), ("Only in B", cmp.only_b)):
        md += ["", f"## {title} ({len(recs)})", ""] + [
            f"- {md_text(cell_name(r))} ({md_text(labels.hardware_key(r))})" for r in recs
        ]
    md += ["", f"## Not comparable ({len(cmp.not_comparable)})", ""]
    md += [f"- {md_text(cell_name(a))}: {md_text('; '.join(why))}" for a, _, why in cmp.not_comparable]
    if cmp.failed:
        md += ["", "## Failed cells", ""]
        for side, r in cmp.failed:
            e = r.get("error") if isinstance(r.get("error"), dict) else {}
            md.append(
                f"- {side}: {md_text(cell_name(r))}: "
                + md_text(f"{e.get('type', '?')}: {str(e.get('message', ''))[:200]}")
            )
    if cmp.problems:
        md += ["", "## Skipped files", ""] + [f"- {md_text(p)}" for p in cmp.problems]
    return "\n".join(md) + "\n"


CSS = (
    "body{font:14px system-ui,sans-serif;margin:20px;overflow-wrap:anywhere}"
    "table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
    "th{background:#eef1f4;cursor:pointer;user-select:none}th[aria-sort=ascending]::after{content:' ▲'}"
    "th[aria-sort=descending]::after{content:' ▼'}tr[hidden]{display:none}"
    "tr.worse td.verdict{color:#b03a2e;font-weight:600}tr.better td.verdict{color:#1e8449;font-weight:600}"
    "tr.flagged td{color:#666;background:#f4f4f4}.filters{display:flex;gap:12px;margin:8px 0;flex-wrap:wrap}"
)


def html(cmp: Comparison, all_rows: bool = False) -> str:
    nonce = secrets.token_urlsafe(16)
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; base-uri 'none'"

    def items(recs: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{h(x)}</li>" for x in recs) + "</ul>"

    body_rows = []
    for (_, d), cells in zip(rows(cmp, all_rows), table_rows(cmp, all_rows), strict=True):
        cls = d.verdict.split(":")[0].replace(" ", "-") + (" flagged" if d.flag else "")
        tds = []
        for i, c in enumerate(cells):
            v = {3: d.a, 4: d.b, 5: d.delta, 7: 100 * d.relative}.get(i)
            num = f' data-v="{v!r}"' if isinstance(v, float) and math.isfinite(v) else ""
            tds.append(f'<td class="{h(HEAD[i].split(" ")[0].lower())}"{num}>{h(c)}</td>')
        body_rows.append(f'<tr class="{h(cls)}" data-verdict="{h(d.verdict)}">' + "".join(tds) + "</tr>")
    verdicts = sorted({d.verdict for _, d in rows(cmp, all_rows)}, key=lambda v: ORDER.get(v, 4))
    options = "".join(f'<option value="{h(v)}">{h(v)}</option>' for v in verdicts)
    body = [
        "<h1>SlimBench comparison</h1>",
        f"<p>A: {h(', '.join(cmp.sources[0]))}<br>B: {h(', '.join(cmp.sources[1]))}</p>",
        "<h2>Summary</h2>",
        items(summary(cmp)),
        f"<h2>Compared cells ({len(cmp.pairs)})</h2>",
        '<div class="filters"><label>filter <input id="q" type="search" placeholder="cell, metric, ..."></label>'
        f'<label>verdict <select id="verdict"><option value="">all</option>{options}</select></label>'
        '<span><span id="shown"></span> rows shown; click a header to sort</span></div>',
        '<table id="cmp"><thead><tr>' + "".join(f"<th>{h(c)}</th>" for c in HEAD) + "</tr></thead><tbody>",
        *body_rows,
        "</tbody></table>",
    ]
    for title, recs in (("Only in A", cmp.only_a), ("Only in B", cmp.only_b)):
        body += [f"<h2>{title} ({len(recs)})</h2>", items([f"{cell_name(r)} ({labels.hardware_key(r)})" for r in recs])]
    body += [
        f"<h2>Not comparable ({len(cmp.not_comparable)})</h2>",
        items([f"{cell_name(a)}: {'; '.join(why)}" for a, _, why in cmp.not_comparable]),
    ]
    if cmp.failed:
        body += [
            "<h2>Failed cells</h2>",
            items([f"{s}: {cell_name(r)}: {(r.get('error') or {}).get('message', '')}" for s, r in cmp.failed]),
        ]
    if cmp.problems:
        body += ["<h2>Skipped files</h2>", items(cmp.problems)]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{h(csp)}">'
        f"<title>SlimBench comparison</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + f'\n<script nonce="{nonce}">{COMPARE_JS}</script>\n</body></html>\n'
    )
