"""The serving task in reports: the max-rate-within-SLO column of the leaderboard and a serving section.

A ``serving`` record's headline is ``max_rps_within_slo``: the highest request rate, among its
load points, at which the service-level objective held. It becomes one leaderboard column per
(server, SLO) found in the records: ``max req/s in SLO`` when there is one, else
``max req/s in SLO [llama.cpp; TTFT p90 ≤ 1000 ms, ITL p90 ≤ 100 ms]`` and so on, so only like is
compared with like. ``compare`` needs nothing from here: it compares every metric two like
cells share, this one included (``--fail-if-worse max_rps_within_slo=10%``).

The serving section of leaderboard.md lists, per model and hardware, each method and server
with its max rate, the synchronous latencies, the highest throughput, the load generator's share
of the CPU, and the curves (slimbench.report.serving_plots).
"""

from __future__ import annotations

import math
from typing import Any

from slimbench.report import labels
from slimbench.report.escape import md_text
from slimbench.report.formatting import fmt

TASK = "serving"
BASE = "max req/s in SLO"


def is_serving(rec: dict[str, Any]) -> bool:
    return rec.get("task", {}).get("name") == TASK and rec.get("status", "ok") == "ok"


def server_name(rec: dict[str, Any]) -> str:
    s = (rec.get("task_details") or {}).get("server") or {}
    name = str(s.get("name") or (rec["task"].get("params") or {}).get("server") or "?")
    return f"{name}/{s['flavour']}" if s.get("flavour") else name


def slo_words(rec: dict[str, Any]) -> str:
    return str(((rec.get("task_details") or {}).get("slo") or {}).get("words") or "SLO")


def value(rec: dict[str, Any], metric: str = "max_rps_within_slo") -> float:
    m = (rec.get("metrics") or {}).get(metric)
    v = m.get("value") if isinstance(m, dict) else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def column_names(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(server, SLO words) -> leaderboard column."""
    combos = sorted({(server_name(r), slo_words(r)) for r in records if is_serving(r)})
    if len(combos) == 1:
        return {combos[0]: BASE}
    return {c: f"{BASE} [{c[0]}; {c[1]}]" for c in combos}


def fill(rows: dict[tuple, dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """Put each serving record's max rate into its leaderboard row; return the columns, in order."""
    names = column_names(records)
    for r in records:
        if not is_serving(r):
            continue
        key = (labels.hardware_key(r), r["model"]["name"], labels.method_identity(r))
        row = rows.get(key)
        if row is not None:
            row[names[(server_name(r), slo_words(r))]] = value(r)
    for row in rows.values():
        for col in names.values():
            row.setdefault(col, math.nan)
    return list(names.values())


def markdown_section(records: list[dict[str, Any]], plots: list[Any]) -> str:
    """``## Serving under load``: one table per model and hardware, and the curves' files."""
    recs = [r for r in records if is_serving(r)]
    if not recs:
        return ""
    lines = ["## Serving under load", "",
             "Max req/s in SLO: the highest request rate among the measured load points at which the SLO held "
             "(a failed request misses it). Loadgen CPU: the load generator's share of the CPU that server and "
             "generator used during the load points (on a small machine it competes with the server).", ""]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault((labels.hardware_key(r), r["model"]["name"]), []).append(r)
    for (hw, model), rs in sorted(groups.items()):
        lines += [f"### {md_text(model)} — {md_text(hw)}", "",
                  "| method | server | SLO | max req/s in SLO | sync TTFT p50 ms | sync ITL p50 ms "
                  "| max req/s | max out tok/s | loadgen CPU | noisy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda x: (labels.method_label(x), server_name(x))):
            d = r.get("task_details") or {}
            cells = [labels.method_label(r), server_name(r), slo_words(r), value(r),
                     value(r, "sync_ttft_p50_ms"), value(r, "sync_itl_p50_ms"), value(r, "max_request_throughput"),
                     value(r, "max_output_tokens_per_s"), value(r, "loadgen_cpu_share_in_load"),
                     "; ".join(d.get("noise_reasons") or [])[:120]]
            lines.append("| " + " | ".join(md_text(fmt(c)) if isinstance(c, float) else md_text(str(c))
                                            for c in cells) + " |")
        lines.append("")
        for p in plots:
            if p.model == model and p.hardware == hw:
                lines.append(f"![{md_text(p.title)}]({p.path.name})")
        lines.append("")
    return "\n".join(lines)
