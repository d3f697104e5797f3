"""The self-contained HTML report: one file, inline CSS and JS, plots embedded, no network.

- Leaderboard per hardware section, sortable by any column (click its header), filterable
  by model, method family, execution and task (each model's baseline row stays in view: it is
  the reference of every Δ); the model and method columns stay in view when the table scrolls
  sideways; more efficiency columns one click away. A timing that is not a result carries its
  flag (noisy, under-sampled) in the cell, greyed.
- Pareto plots as embedded PNGs (the static view) with an image map: hovering a point shows
  its method, values and execution (points on one spot are listed together), clicking it opens
  that row's cells; under each plot the list of its points. The model and task filters show and
  hide plots and list items; the family and execution filters cannot redraw a plot, and a note
  says so while one is set. A plot with no trusted native timing is greyed with a banner.
- A details view per row (method config and version, method report with its warnings,
  environment, each task's protocol, metrics and details, how its timings and memory were
  taken), failed cells with their errors, and the files that were skipped.

Every string from a suite, a plugin or a record is escaped (``html_text``; names through
``html_name``, which also isolates them and shows invisible characters); a Content Security
Policy lets only this page's own script run (by nonce) and allows no connection.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from slimbench.measure.trust import interleaving, roofline_denominator, roofline_errors, timing_trust
from slimbench.report import labels
from slimbench.report.escape import html_name as hn
from slimbench.report.escape import html_text as h
from slimbench.report.escape import reveal
from slimbench.report.formats import INTRO, failed_rows, protocol_table, timing_notes
from slimbench.report.formatting import fmt
from slimbench.report.html_assets import CSS, JS
from slimbench.report.plots import Plot, tooltip
from slimbench.report.records import Loaded
from slimbench.report.table import FLAGS, Leaderboard


def jdump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str, ensure_ascii=False)


def shorten(obj: Any, limit: int = 12) -> Any:
    """Long per-example lists cut to their first values (they stay complete in the record)."""
    if isinstance(obj, dict):
        return {k: shorten(v, limit) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > limit:
            return [shorten(v, limit) for v in obj[:limit]] + [f"… ({len(obj)} values in all)"]
        return [shorten(v, limit) for v in obj]
    return obj


def pre(obj: Any) -> str:
    return f"<pre>{h(jdump(shorten(obj)))}</pre>"


def cell_html(v: Any, extra: str = "", mark: str = "", title: str = "", note: str = "") -> str:
    """A table cell; ``mark``: a flag shown beside the value (noisy), ``note``: words read with it."""
    tip = f' title="{h(title)}"' if title else ""
    after = (f' <span class="flag">{h(mark)}</span>' if mark else "") + (
        f' <span class="note">{h(note)}</span>' if note else ""
    )
    if isinstance(v, int | float) and not isinstance(v, bool):
        cls = "num" + (f" {extra}" if extra else "")
        if math.isnan(float(v)):
            return f'<td class="{cls}">–</td>'
        return f'<td class="{cls}" data-v="{float(v)!r}"{tip}>{h(fmt(v))}{after}</td>'
    cls = f' class="{extra}"' if extra else ""
    return f"<td{cls}{tip}>{h(fmt(v))}{after}</td>"


def column_info(lb: Leaderboard) -> dict[str, dict[str, str]]:
    """Per display column: its task (for the task filter), whether it is an extra column, its tooltip."""
    info: dict[str, dict[str, str]] = {}
    for q in lb.quality:
        tip = (
            f"{q.protocol}; {q.metric} in {q.unit or 'its unit'}, {'higher' if q.higher_better else 'lower'} is better"
        )
        for c in (q.col, q.delta, q.noise):
            info[c] = {"task": q.task, "tip": tip}
    ttft = {e.regime for e in lb.efficiency if e.metric == "ttft_ms"}
    for e in lb.efficiency:
        # prefill latency repeats TTFT where a record has both: one click away, so the table fits the view
        main = e.main and not (e.metric == "prefill_ms" and e.regime in ttft)
        info[e.col] = {
            "extra": "" if main else "extra",
            "tip": e.axis + (f"; {labels.regime_words(e.regime)}" if e.regime else ""),
            "regime": labels.regime_label(e.regime) if e.regime else "efficiency",
        }
    for c, tip in SIZE_TIPS.items():
        info[c] = {"extra": "extra" if c in EXTRA_SIZE else "", "tip": tip}
    info["warnings"] = {"extra": "extra", "tip": "what the method reported about its own settings (⚠ beside it)"}
    return info


# The method report's columns: their meaning on hover; parameters and compression time one click away.
SIZE_TIPS = {
    "stored MB": "real bytes of the saved format (MB)",
    "eff. bits": "bits per linear weight, scales and zero-points included",
    "params M": "parameters (millions)",
    "sparsity": "share of linear weights that are exactly zero (for a quantizer: rounded to zero)",
    "compress s": "compression seconds",
}
EXTRA_SIZE = ("params M", "compress s")


def breakable(text: str) -> str:
    """A header that may wrap after @ / _ and before [, so a narrow column breaks it at a sensible place."""
    out = h(text)
    for mark in ("@", "/", "_"):
        out = out.replace(mark, mark + "<wbr>")
    return out.replace("[", "<wbr>[")


def noise_cell(text: str) -> str:
    """The paired-noise verdict compact: the verdict, Δ and its interval (the unit is in the header)."""
    verdict, _, rest = text.partition(" (")
    if not rest or "CI [" not in rest:
        return h(text)
    delta = rest.split(" ")[3] if len(rest.split(" ")) > 3 else ""
    interval = "[" + rest.split("CI [", 1)[1].rstrip(")")
    cls = "noise" if verdict.startswith("≈") else "sig"
    return f'<span class="{cls}">{h(verdict)}</span> {h(delta)} {h(interval)}'


def flags_cell(r: pd.Series) -> str:
    """Badges per flag and the regimes they hit; each regime's reasons on hover."""
    out = []
    for where, why in r["_flag_reasons"].items():
        label = why.split(":", 1)[0]
        out.append(f'<span class="badge flagged" title="{h(why)}">{h(label)}</span> {h(where)}')
    return "<br>".join(out)


def filter_attrs(r: pd.Series) -> dict[str, list[str]]:
    """What the filters match a row (or a plot point of it) on."""
    return {
        "model": [r["model"]],
        "family": r["family"].split("+"),
        "execution": [r["execution"]],
        "task": sorted({c["task"]["name"] for c in r["_cells"]}),
    }


def data_attrs(attrs: dict[str, list[str]]) -> str:
    """Filter attributes; values revealed as the filter options show them (so the two always match)."""
    return " ".join(f'data-{k}="{h(json.dumps([reveal(x) for x in v]))}"' for k, v in attrs.items())


def row_html(idx: int, r: pd.Series, cols: list[str], info: dict, lb: Leaderboard) -> str:
    classes = ["sim" if r["execution"] == "simulated" else "native"]
    if r["method_name"] == "baseline":
        classes.append("baseline")
    if r[FLAGS]:
        classes.append("flagged")
    tds = []
    for c in cols:
        i = info.get(c, {})
        flag, note = lb.flag(r, c), r["_notes"].get(c, "")
        extra = " ".join(x for x in (i.get("extra", ""), "flagged" if flag else "") if x)
        task_attr = f' data-task="{h(i["task"])}"' if "task" in i else ""
        v = r.get(c, "")
        if c == "method":
            warn = f' <span class="warn" title="{h(r["warnings"])}">⚠</span>' if r["warnings"] else ""
            tds.append(f'<td class="method">{hn(v)}{warn} <a href="#row-{idx}">details</a></td>')
        elif c == "execution":
            tds.append(f'<td><span class="badge {h(v)}">{h(v)}</span></td>')
        elif c == "model":
            tds.append(f'<td class="nw" title="{h(v)}">{hn(v)}</td>')
        elif c == FLAGS:
            tds.append(f'<td class="flags" title="{h(v)}">{flags_cell(r)}</td>')
        elif c.startswith("noise "):
            tds.append(f'<td class="text noise"{task_attr} title="{h(v)}">{noise_cell(str(v))}</td>')
        elif c == "warnings":  # the ⚠ beside the method says so; the text is one click away
            tds.append(f'<td class="text extra"{task_attr}>{h(v)}</td>')
        else:
            title = f"{flag}: {r[FLAGS]}" if flag else r["_denominators"].get(c, "")
            den = r["_denominators"].get(c, "")
            cell = cell_html(
                v,
                " ".join(x for x in (extra, info.get(c, {}).get("extra", "")) if x),
                mark=flag,
                title=title,
                note=note or den,
            )
            tds.append(cell.replace("<td", f"<td{task_attr}", 1))
    attrs = data_attrs(filter_attrs(r))
    return f'<tr id="lb-{idx}" class="{" ".join(classes)}" {attrs}>' + "".join(tds) + "</tr>"


def leaderboard_html(lb: Leaderboard) -> list[str]:
    df = lb.df
    cols = lb.columns(all_efficiency=True)
    info = column_info(lb)
    families = sorted({f for fam in df["family"] for f in fam.split("+")})
    tasks = sorted({c["task"]["name"] for cells in df["_cells"] for c in cells})

    def select(name: str, values: list[str]) -> str:
        opts = "".join(f'<option value="{h(v)}">{h(v)}</option>' for v in values)  # revealed, escaped
        return f'<label>{name} <select data-filter="{name}"><option value="">all</option>{opts}</select></label>'

    out = [
        '<section id="leaderboard"><h2>Leaderboard</h2>',
        f"<p>{h(INTRO.replace('`', ''))}</p>",
        '<div class="filters">',
    ]
    out += [
        select("model", sorted(df["model"].unique())),
        select("family", families),
        select("execution", sorted(df["execution"].unique())),
        select("task", tasks),
    ]
    out += [
        '<label><input type="checkbox" id="allcols"> all columns</label>',
        f'<span><span id="shown">{len(df)}</span> of {len(df)} rows shown (each model\'s baseline stays: it is '
        "the reference of every Δ)</span></div>",
    ]
    for hw, sec in df.groupby("hardware", sort=False):
        out.append(f"<h3>{hn(hw)}</h3>")
        prot = protocol_table(lb, sec)
        if prot:
            out.append('<table class="protocol"><tr><th>column</th><th>protocol</th><th>unit</th></tr>')
            out += [f"<tr><td>{h(c)}</td><td>{h(p)}</td><td>{h(u)}</td></tr>" for c, p, u in prot]
            out.append("</table>")
        head = []
        for c in cols:
            i = info.get(c, {})
            cls = f' class="{i["extra"]}"' if i.get("extra") else ""
            task = f' data-task="{h(i["task"])}"' if "task" in i else ""
            head.append(f'<th{cls}{task} title="{h(i.get("tip", "click to sort"))}">{breakable(c)}</th>')
        out.append('<div class="wrap"><table class="lb"><thead><tr>' + "".join(head) + "</tr></thead><tbody>")
        out += [row_html(int(idx), r, cols, info, lb) for idx, r in sec.iterrows()]
        out.append("</tbody></table></div>")
        notes = timing_notes(sec)
        if notes:
            out.append("<details><summary>how the timings were taken</summary><ul>")
            out += [f"<li>{h(n)}</li>" for n in notes]
            out.append("</ul></details>")
    out.append("</section>")
    return out


def clusters(points: list, radius: float = 7.0) -> list[list]:
    """Points whose markers overlap in the image, grouped (one hover area lists them all)."""
    groups: list[list] = []
    for pt in points:
        for g in groups:
            if abs(g[0].px - pt.px) <= radius and abs(g[0].py - pt.py) <= radius:
                g.append(pt)
                break
        else:
            groups.append([pt])
    return groups


def plot_html(k: int, p: Plot, lb: Leaderboard) -> str:
    img = base64.b64encode(p.path.read_bytes()).decode("ascii")
    areas = []
    for g in clusters(p.points):
        x, y = sum(pt.px for pt in g) / len(g), sum(pt.py for pt in g) / len(g)
        tip = (
            tooltip(g[0], p, lb)
            if len(g) == 1
            else f"{len(g)} points here:\n" + "\n—\n".join(tooltip(pt, p, lb) for pt in g)
        )
        areas.append(
            f'<area shape="circle" coords="{x:.0f},{y:.0f},9" href="#row-{g[0].row}" title="{h(tip)}" '
            f'alt="{h(", ".join(pt.label for pt in g))}">'
        )
    models = sorted({reveal(lb.df.loc[pt.row, "model"]) for pt in p.points})
    task = next((q.task for q in lb.quality if q.col == p.quality), "")
    items = []
    for pt in sorted(p.points, key=lambda pt: (not pt.baseline, pt.label)):
        r = lb.df.loc[pt.row]
        flag = f' <span class="flag">{h(pt.flag)}</span>' if pt.flag else ""
        items.append(
            f'<li {data_attrs(filter_attrs(r))}><a href="#row-{pt.row}">{hn(r["method"])}</a> '
            f"({h(r['execution'])}): {h(fmt(pt.y))} · {h(fmt(pt.x))}{flag}</li>"
        )
    banner = f'<p class="banner">{h(p.greyed)}.</p>' if p.greyed else ""
    return (
        f'<figure class="{"greyed" if p.greyed else "plot"}" data-model="{h(json.dumps(models))}" '
        f'data-task="{h(json.dumps([task]))}">{banner}'
        f'<img src="data:image/png;base64,{img}" width="{p.width}" height="{p.height}" '
        f'usemap="#map-{k}" alt="{h(p.title)}" title="{h(p.title)}"><map name="map-{k}">{"".join(areas)}</map>'
        f"<details><summary>its {len(p.points)} points (y · x)</summary><ul>{''.join(items)}</ul></details></figure>"
    )


def plots_html(plots: list[Plot], lb: Leaderboard) -> list[str]:
    if not plots:
        return []
    out = [
        '<section id="plots"><h2>Pareto plots</h2>',
        '<p class="legend"><span>★ baseline</span><span>● native</span><span>○ simulated (off latency and memory '
        "frontiers)</span><span>grey dotted: a noisy or under-sampled timing, not a result (off every frontier)"
        "</span><span>dashed: Pareto frontier</span>"
        "<span>Hover a point for its values (points on one spot are listed together); click it for its cells."
        "</span></p>",
        '<p class="box plotnote" id="plotnote">The plots show every method of their model: the '
        '<span id="plotnote-what"></span> filter cannot redraw them (their point lists below follow it).</p>',
    ]
    last = None
    for k, p in enumerate(plots):
        if (p.hardware, p.model) != last:
            out.append(f"<h3>{hn(p.model)} <small>· {hn(p.hardware)}</small></h3>")
            last = (p.hardware, p.model)
        out.append(plot_html(k, p, lb))
    out.append("</section>")
    return out


def record_summary(rec: dict[str, Any]) -> list[str]:
    out = [
        f"<h4>{h(rec['task']['name'])}@{h(rec['task'].get('version', '?'))} "
        f"<small>run {h(rec['run_id'])} · {h(rec.get('status', '?'))}</small></h4>",
        f"<p>{h(labels.protocol(rec))}</p>",
    ]
    metrics = rec.get("metrics") or {}
    if metrics:
        out.append("<table><tr><th>metric</th><th>value</th><th>unit</th><th>spread</th></tr>")
        for name, m in sorted(metrics.items()):
            m = m if isinstance(m, dict) else {"value": m}
            spread = m.get("spread") if isinstance(m.get("spread"), dict) else {}
            sp = ", ".join(f"{k} {fmt(v)}" for k, v in spread.items()) if spread else ""
            out.append(
                f"<tr><td>{h(name)}</td>{cell_html(m.get('value'))}<td>{h(m.get('unit', ''))}</td><td>{h(sp)}</td></tr>"
            )
        out.append("</table>")
    details = rec.get("task_details") or {}
    out += how_measured(rec)
    out += ["<details><summary>task details</summary>", pre(details), "</details>"]
    return out


def how_measured(rec: dict[str, Any]) -> list[str]:
    """Trust, interleaving, memory protocol and roofline limits of a timed record, in words."""
    out = []
    trust = timing_trust(rec)
    if not trust.trusted:
        out.append(f'<p><span class="badge flagged">{h(trust.label())}</span> {h("; ".join(trust.reasons))}</p>')
    done, text = interleaving(rec)
    if done is not None:
        out.append(f"<p>Timings: {h(text)}</p>")
    mem = (rec.get("task_details") or {}).get("memory_protocol")
    if isinstance(mem, dict):
        clean = {True: "verified clean", False: "not verified clean"}.get(mem.get("clean"), "")
        parts = [str(mem.get("isolation") or "?"), clean, str(mem.get("note") or "")]
        out.append(f"<p>Memory measured in: {h(', '.join(x for x in parts if x))}</p>")
    for metric in ("decode_roofline_fraction", "prefill_roofline_fraction"):
        den = roofline_denominator(rec, metric)
        if den and metric in (rec.get("metrics") or {}):
            out.append(f"<p>{h(metric)}: {h(den)}</p>")
    out += [f'<p class="warn">Not reported (a measurement error): {h(e)}</p>' for e in roofline_errors(rec)]
    return out


def cells_html(lb: Leaderboard) -> list[str]:
    out = ['<section id="cells"><h2>Cell details</h2>']
    for idx, r in lb.df.iterrows():
        first = r["_cells"][0]
        rep = first.get("method_report") or {}
        out.append(
            f'<details class="cell" id="row-{int(idx)}"><summary>{hn(r["model"])} · {hn(r["method"])} · '
            f'<span class="badge {h(r["execution"])}">{h(r["execution"])}</span> · {h(r["hardware"])}</summary>'
        )
        if rep.get("warnings"):
            out.append(
                '<p class="warn">Method warnings:</p><ul>'
                + "".join(f'<li class="warn">{h(w)}</li>' for w in rep["warnings"])
                + "</ul>"
            )
        out += [
            "<p>Method config (with version and provider):</p>",
            pre(first["method"]),
            "<details><summary>method report</summary>",
            pre(rep),
            "</details>",
            "<details><summary>environment</summary>",
            pre(first.get("environment") or {}),
            "</details>",
            "<details><summary>model</summary>",
            pre(first["model"]),
            "</details>",
        ]
        # quality tasks first, then efficiency regimes from the smallest batch and prompt
        for rec in sorted(
            r["_cells"], key=lambda c: (labels.regime(c) is not None, labels.regime(c) or (0, 0, 0), labels.task_key(c))
        ):
            out += record_summary(rec)
        out.append("</details>")
    out.append("</section>")
    return out


def failed_html(loaded: Loaded) -> list[str]:
    if not loaded.failed:
        return []
    out = [
        '<section id="failed"><h2>Failed cells</h2><p>The latest attempt of each of these cells failed '
        "(earlier attempts stay in the store).</p>",
        "<table><tr><th>model</th><th>method</th><th>task</th><th>stage</th><th>error</th></tr>",
    ]
    for f in failed_rows(loaded):
        out.append(
            "<tr>"
            + "".join(f"<td>{hn(f[k])}</td>" for k in ("model", "method", "task", "stage"))
            + f'<td><a href="#failed-{h(f["run_id"])}">{h(f["error"][:300])}</a></td></tr>'
        )
    out.append("</table>")
    for rec in loaded.failed:
        e = rec.get("error") if isinstance(rec.get("error"), dict) else {}
        out += [
            f'<details class="cell" id="failed-{h(rec["run_id"])}"><summary>{h(rec["model"]["name"])} · '
            f"{h(labels.method_label(rec))} · {h(rec['task']['name'])}: {h(e.get('type', '?'))}</summary>",
            f"<p>{h(e.get('message', ''))}</p>",
            "<p>Method config:</p>",
            pre(rec["method"]),
            "<details><summary>traceback</summary>",
            f"<pre>{h(e.get('traceback', ''))}</pre>",
            "</details>",
            "<details><summary>environment</summary>",
            pre(rec.get("environment") or {}),
            "</details>",
            "<details><summary>task</summary>",
            pre(rec["task"]),
            "</details></details>",
        ]
    out.append("</section>")
    return out


def html_report(lb: Leaderboard | None, loaded: Loaded, plots: list[Plot]) -> str:
    nonce = secrets.token_urlsafe(16)
    csp = (
        f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
        "connect-src 'none'; form-action 'none'; base-uri 'none'"
    )
    n_ok = sum(len(c) for c in lb.df["_cells"]) if lb is not None else 0
    body = [
        "<h1>SlimBench report</h1>",
        f'<p class="meta">Generated {h(datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))} from '
        + ", ".join(f"<code>{h(s)}</code>" for s in loaded.sources)
        + f": {n_ok} ok cells, {len(loaded.failed)} failed, {len(loaded.problems)} skipped files.</p>",
        '<p><a href="#leaderboard">Leaderboard</a> · <a href="#plots">Plots</a> · <a href="#cells">Cell details</a>'
        + (' · <a href="#failed">Failed cells</a>' if loaded.failed else "")
        + "</p>",
    ]
    if loaded.problems:
        body.append(
            '<div class="box"><b>Skipped files</b> (not readable records):<ul>'
            + "".join(f"<li>{h(p)}</li>" for p in loaded.problems)
            + "</ul></div>"
        )
    if lb is None:
        body.append("<p>No ok records yet.</p>")
    else:
        body += leaderboard_html(lb) + plots_html(plots, lb) + cells_html(lb)
    body += failed_html(loaded)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{h(csp)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>SlimBench report</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + f'\n<script nonce="{nonce}">{JS}</script>\n</body></html>\n'
    )
