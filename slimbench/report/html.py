"""The self-contained HTML report: one file, inline CSS and JS, plots embedded, no network.

- Leaderboard per hardware section, sortable by any column (click its header), filterable
  by model, method family, execution and task; more efficiency columns one click away.
- Pareto plots as embedded PNGs (the static view) with an image map: hovering a point shows
  its method, values and execution, clicking it opens that row's cells.
- A details view per row (method config and version, method report with its warnings,
  environment, each task's protocol, metrics and details), failed cells with their errors,
  and the files that were skipped.

Every string from a suite, a plugin or a record is escaped (``html_text``); a Content
Security Policy lets only this page's own script run (by nonce) and allows no connection.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from slimbench.report import labels
from slimbench.report.escape import html_text as h
from slimbench.report.formats import INTRO, failed_rows, protocol_table
from slimbench.report.formatting import fmt
from slimbench.report.plots import Plot, tooltip
from slimbench.report.records import Loaded
from slimbench.report.table import Leaderboard

CSS = """
body{font:14px/1.45 system-ui,-apple-system,sans-serif;margin:0 auto;max-width:1500px;padding:0 18px 60px;color:#1d1d1f}
h1{margin:18px 0 4px}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:34px}
.meta{color:#555}
.box{background:#fff7e6;border:1px solid #f0c36d;padding:8px 12px;border-radius:6px;margin:10px 0}
.filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;background:#f4f6f8;padding:8px 10px;
  border-radius:6px;position:sticky;top:0;z-index:2}
.filters label{font-size:13px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #d9dde1;padding:3px 7px;vertical-align:top}
td.nw{white-space:nowrap}
td.method{min-width:170px}
td.text{min-width:260px;font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.lb th{background:#eef1f4;cursor:pointer;user-select:none;position:relative;padding-right:16px}
table.lb th[aria-sort=ascending]::after{content:"▲";position:absolute;right:3px;font-size:9px}
table.lb th[aria-sort=descending]::after{content:"▼";position:absolute;right:3px;font-size:9px}
table.lb:not(.all) .extra{display:none}
.taskhidden{display:none}
tr.baseline td{background:#f7f7f7;font-weight:600}
tr.sim td.method{border-left:3px dashed #c0392b}
tr.native td.method{border-left:3px solid #2471a3}
.badge{display:inline-block;border-radius:9px;padding:0 7px;font-size:12px}
.badge.native{background:#2471a3;color:#fff}
.badge.simulated{border:1.5px dashed #c0392b;color:#c0392b}
.badge.noisy{background:#fde3c2;color:#8a4b00}
.warn{color:#a04000}
td.noisy{background:#fff3e0;text-decoration:underline dotted #e67e22}
figure{display:inline-block;margin:8px 12px 18px 0;vertical-align:top}
details.cell{border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:4px 10px}
details.cell[open]{background:#fbfbfd}
summary{cursor:pointer}
pre{background:#f4f4f6;padding:6px 8px;overflow-x:auto;font-size:12px;max-height:360px}
.legend span{margin-right:14px}
"""

JS = """
(function(){
  function key(td){
    if(!td) return [2,''];
    var v=td.getAttribute('data-v');
    if(v!==null && v!=='') return [0,parseFloat(v)];
    var t=td.textContent.trim();
    return (t===''||t==='\\u2013') ? [2,''] : [1,t.toLowerCase()];
  }
  function sortBy(th){
    var table=th.closest('table'), idx=Array.prototype.indexOf.call(th.parentNode.children,th);
    var asc=th.getAttribute('aria-sort')!=='ascending';
    table.querySelectorAll('th').forEach(function(x){x.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var tb=table.tBodies[0], rows=Array.prototype.slice.call(tb.rows);
    rows.sort(function(a,b){
      var ka=key(a.cells[idx]), kb=key(b.cells[idx]);
      if(ka[0]!==kb[0]) return ka[0]===2?1:(kb[0]===2?-1:ka[0]-kb[0]);
      var c=ka[1]<kb[1]?-1:(ka[1]>kb[1]?1:0);
      return asc?c:-c;
    });
    rows.forEach(function(r){tb.appendChild(r);});
  }
  document.querySelectorAll('table.lb th').forEach(function(th){
    th.addEventListener('click',function(){sortBy(th);});
  });
  var selects=document.querySelectorAll('select[data-filter]');
  function apply(){
    var f={};
    selects.forEach(function(s){ if(s.value) f[s.getAttribute('data-filter')]=s.value; });
    var shown=0;
    document.querySelectorAll('table.lb tbody tr').forEach(function(tr){
      var ok=true;
      Object.keys(f).forEach(function(k){
        var have=JSON.parse(tr.getAttribute('data-'+k)||'[]');
        if(have.indexOf(f[k])<0) ok=false;
      });
      tr.hidden=!ok; if(ok) shown++;
    });
    document.querySelectorAll('table.lb [data-task]').forEach(function(c){
      c.classList.toggle('taskhidden', !!f.task && c.getAttribute('data-task')!==f.task);
    });
    var n=document.getElementById('shown'); if(n) n.textContent=String(shown);
  }
  selects.forEach(function(s){ s.addEventListener('change',apply); });
  var all=document.getElementById('allcols');
  if(all) all.addEventListener('change',function(){
    document.querySelectorAll('table.lb').forEach(function(t){t.classList.toggle('all',all.checked);});
  });
  function openHash(){
    var id=decodeURIComponent(location.hash.slice(1)); if(!id) return;
    var el=document.getElementById(id); if(el && el.tagName==='DETAILS') el.open=true;
  }
  window.addEventListener('hashchange',openHash); openHash();
  apply();
})();
"""


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


def cell_html(v: Any, extra: str = "") -> str:
    cls = f' class="{extra}"' if extra else ""
    if isinstance(v, int | float) and not isinstance(v, bool):
        if math.isnan(float(v)):
            return f'<td class="num{(" " + extra) if extra else ""}">–</td>'
        return f'<td class="num{(" " + extra) if extra else ""}" data-v="{float(v)!r}">{h(fmt(v))}</td>'
    return f"<td{cls}>{h(fmt(v))}</td>"


def column_info(lb: Leaderboard) -> dict[str, dict[str, str]]:
    """Per display column: its task (for the task filter), whether it is an extra column, its tooltip."""
    info: dict[str, dict[str, str]] = {}
    for q in lb.quality:
        tip = (
            f"{q.protocol}; {q.metric} in {q.unit or 'its unit'}, {'higher' if q.higher_better else 'lower'} is better"
        )
        for c in (q.col, q.delta, q.noise):
            info[c] = {"task": q.task, "tip": tip}
    for e in lb.efficiency:
        info[e.col] = {
            "extra": "" if e.main else "extra",
            "tip": e.axis + (f"; {labels.regime_words(e.regime)}" if e.regime else ""),
            "regime": labels.regime_label(e.regime) if e.regime else "efficiency",
        }
    return info


def row_html(idx: int, r: pd.Series, cols: list[str], info: dict, eff_cols: set[str]) -> str:
    tasks = sorted({c["task"]["name"] for c in r["_cells"]})
    fams = r["family"].split("+")
    classes = ["sim" if r["execution"] == "simulated" else "native"]
    if r["method_name"] == "baseline":
        classes.append("baseline")
    if r["noisy"]:
        classes.append("noisy")
    attrs = {
        "model": [r["model"]],
        "family": fams,
        "execution": [r["execution"]],
        "task": tasks,
    }
    data = " ".join(f'data-{k}="{h(json.dumps(v))}"' for k, v in attrs.items())
    tds = []
    for c in cols:
        i = info.get(c, {})
        noisy = c in eff_cols and i.get("regime") in r["_noisy"]  # only the flagged regime's timings
        extra = " ".join(x for x in (i.get("extra", ""), "noisy" if noisy else "") if x)
        task_attr = f' data-task="{h(i["task"])}"' if "task" in i else ""
        v = r.get(c, "")
        if c == "method":
            warn = f' <span class="warn" title="{h(r["warnings"])}">⚠</span>' if r["warnings"] else ""
            tds.append(f'<td class="method">{h(v)}{warn} <a href="#row-{idx}">details</a></td>')
        elif c == "execution":
            tds.append(f'<td><span class="badge {h(v)}">{h(v)}</span></td>')
        elif c == "model":
            tds.append(f'<td class="nw">{h(v)}</td>')
        elif c in ("warnings", "noisy") or c.startswith("noise "):
            tds.append(
                f'<td class="text"{task_attr}>{h(v)}</td>'
                if c != "noisy" or not v
                else f'<td class="text"><span class="badge noisy">noisy</span> {h(v)}</td>'
            )
        else:
            tds.append(cell_html(v, extra).replace("<td", f"<td{task_attr}", 1))
    return f'<tr id="lb-{idx}" class="{" ".join(classes)}" {data}>' + "".join(tds) + "</tr>"


def leaderboard_html(lb: Leaderboard) -> list[str]:
    df = lb.df
    cols = lb.columns(all_efficiency=True)
    info = column_info(lb)
    eff_cols = {e.col for e in lb.efficiency}
    families = sorted({f for fam in df["family"] for f in fam.split("+")})
    tasks = sorted({c["task"]["name"] for cells in df["_cells"] for c in cells})

    def select(name: str, values: list[str]) -> str:
        opts = "".join(f'<option value="{h(v)}">{h(v)}</option>' for v in values)
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
        '<label><input type="checkbox" id="allcols"> all efficiency columns</label>',
        f'<span><span id="shown">{len(df)}</span> of {len(df)} rows shown</span></div>',
    ]
    for hw, sec in df.groupby("hardware", sort=False):
        out.append(f"<h3>{h(hw)}</h3>")
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
            head.append(f'<th{cls}{task} title="{h(i.get("tip", "click to sort"))}">{h(c)}</th>')
        out.append('<div class="wrap"><table class="lb"><thead><tr>' + "".join(head) + "</tr></thead><tbody>")
        out += [row_html(int(idx), r, cols, info, eff_cols) for idx, r in sec.iterrows()]
        out.append("</tbody></table></div>")
    out.append("</section>")
    return out


def plots_html(plots: list[Plot], lb: Leaderboard) -> list[str]:
    if not plots:
        return []
    out = [
        '<section id="plots"><h2>Pareto plots</h2>',
        '<p class="legend"><span>★ baseline</span><span>● native</span><span>○ simulated (off latency and memory '
        "frontiers)</span><span>dotted ring: noisy timing</span><span>dashed: Pareto frontier</span>"
        "<span>Hover a point for its values; click it for its cells.</span></p>",
    ]
    last = None
    for k, p in enumerate(plots):
        if (p.hardware, p.model) != last:
            out.append(f"<h3>{h(p.model)} <small>· {h(p.hardware)}</small></h3>")
            last = (p.hardware, p.model)
        img = base64.b64encode(p.path.read_bytes()).decode("ascii")
        areas = "".join(
            f'<area shape="circle" coords="{pt.px:.0f},{pt.py:.0f},9" href="#row-{pt.row}" '
            f'title="{h(tooltip(pt, p, lb))}" alt="{h(pt.label)}">'
            for pt in p.points
        )
        out.append(
            f'<figure><img src="data:image/png;base64,{img}" width="{p.width}" height="{p.height}" '
            f'usemap="#map-{k}" alt="{h(p.title)}" title="{h(p.title)}"><map name="map-{k}">{areas}</map></figure>'
        )
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
    if details.get("noisy"):
        out.append(
            '<p><span class="badge noisy">noisy</span> '
            + h(", ".join(map(str, details.get("noise_reasons") or [])))
            + "</p>"
        )
    out += ["<details><summary>task details</summary>", pre(details), "</details>"]
    return out


def cells_html(lb: Leaderboard) -> list[str]:
    out = ['<section id="cells"><h2>Cell details</h2>']
    for idx, r in lb.df.iterrows():
        first = r["_cells"][0]
        rep = first.get("method_report") or {}
        out.append(
            f'<details class="cell" id="row-{int(idx)}"><summary>{h(r["model"])} · {h(r["method"])} · '
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
            + "".join(f"<td>{h(f[k])}</td>" for k in ("model", "method", "task", "stage"))
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
