"""Two result sets side by side: only like with like, each delta with its noise.

Two cells are comparable when they have the same model (name and revision), the same method
config and version (every step's name, parameters, version and plugin provider), the same
task (name, version, parameters) and the same hardware class (device, dtype, threads and the
processor's name). Everything else is listed as only in A, only in B, or "not comparable"
with the fields that differ, never silently matched.

For each metric both cells have, the delta B - A comes with its noise:

- the paired bootstrap where both records keep per-example scores (``task_details
  ["per_example"]``; the task's paired metric, e.g. per-window NLL for perplexity): the two
  runs are paired example by example (slimbench.measure.stats.paired_delta_from_details);
- else the spread of repeats where both keep raw samples (latency): a seeded bootstrap
  interval of the difference of the medians;
- else none (a single value per side): the delta is shown without an interval.

``regressions`` checks rules ``METRIC=TOL`` (TOL absolute, or relative with ``%``): a metric
that got worse by more than TOL, beyond its noise where an interval exists, is a regression.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimbench.report import labels
from slimbench.report.escape import html_text as h
from slimbench.report.escape import md_text
from slimbench.report.formatting import fmt
from slimbench.report.records import Loaded


def like_key(rec: dict[str, Any]) -> tuple[str, ...]:
    """What must be equal for two cells to be compared."""
    m, t = rec["model"], rec["task"]
    return (
        str(m["name"]),
        str(m.get("revision")),
        labels.method_identity(rec),
        str(t["name"]),
        str(t.get("version")),
        json.dumps(t.get("params") or {}, sort_keys=True, default=str),
        labels.hardware_key(rec),
    )


KEY_FIELDS = (
    "model",
    "model revision",
    "method config and version",
    "task",
    "task version",
    "task parameters",
    "hardware class",
)


def loose_key(rec: dict[str, Any]) -> tuple[str, str, str]:
    """Model, method name, task name: cells a reader might expect to be compared."""
    return str(rec["model"]["name"]), str(rec["method"]["name"]), str(rec["task"]["name"])


@dataclass
class Delta:
    metric: str
    a: float
    b: float
    unit: str
    higher_better: bool
    noise: dict[str, Any] | None = None  # ci_low, ci_high, within_noise, how

    @property
    def delta(self) -> float:
        return self.b - self.a

    @property
    def relative(self) -> float:
        return self.delta / abs(self.a) if self.a else math.nan

    @property
    def worse(self) -> bool:
        return self.delta < 0 if self.higher_better else self.delta > 0


@dataclass
class Pair:
    a: dict[str, Any]
    b: dict[str, Any]
    deltas: list[Delta]


@dataclass
class Comparison:
    pairs: list[Pair] = field(default_factory=list)
    only_a: list[dict[str, Any]] = field(default_factory=list)
    only_b: list[dict[str, Any]] = field(default_factory=list)
    not_comparable: list[tuple[dict, dict, list[str]]] = field(default_factory=list)
    failed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # ("A"/"B", failed record)
    sources: tuple[list[str], list[str]] = ([], [])
    problems: list[str] = field(default_factory=list)


def repeats_interval(sa: list[float], sb: list[float], n: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Bootstrap interval of median(B) - median(A) from the raw repeats of each side."""
    a, b = np.asarray(sa, dtype=float), np.asarray(sb, dtype=float)
    if a.size < 2 or b.size < 2:
        return None
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, (n, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, (n, b.size))], axis=1)
    lo, hi = np.quantile(mb - ma, [0.025, 0.975])
    return {
        "ci_low": float(lo),
        "ci_high": float(hi),
        "within_noise": bool(lo <= 0 <= hi),
        "how": f"spread of repeats ({a.size} vs {b.size} samples, 95% bootstrap of the median difference)",
    }


def paired_interval(a: dict, b: dict, metric: str) -> dict[str, Any] | None:
    from slimbench.measure.stats import paired_delta_from_details

    try:
        p = paired_delta_from_details(b.get("task_details") or {}, a.get("task_details") or {}, metric)
    except (ValueError, TypeError, KeyError):
        return None
    return {
        "ci_low": p["ci_low"],
        "ci_high": p["ci_high"],
        "within_noise": p["within_noise"],
        "how": f"paired bootstrap over {p['n']} examples (Δ {metric} {fmt(p['delta'])}, 95% CI)",
    }


def metric_deltas(a: dict[str, Any], b: dict[str, Any]) -> list[Delta]:
    ma, mb = a.get("metrics") or {}, b.get("metrics") or {}
    task = a["task"]["name"]
    quality, paired = labels.quality_metric(task), labels.paired_metric(task)
    out = []
    for name in sorted(set(ma) & set(mb)):
        xa, xb = ma[name], mb[name]
        if not (isinstance(xa, dict) and isinstance(xb, dict)):
            continue
        va, vb = xa.get("value"), xb.get("value")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (va, vb)):
            continue
        d = Delta(name, float(va), float(vb), str(xa.get("unit", "")), bool(xa.get("higher_is_better", False)))
        if paired and name in {quality, paired}:
            d.noise = paired_interval(a, b, paired)
        if d.noise is None and isinstance(xa.get("samples"), list) and isinstance(xb.get("samples"), list):
            d.noise = repeats_interval(xa["samples"], xb["samples"])
        out.append(d)
    return out


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Which identity fields differ, in words (for cells that look alike but are not comparable)."""
    out = []
    for name, x, y in zip(KEY_FIELDS, like_key(a), like_key(b), strict=True):
        if x != y:
            if name == "method config and version":
                x, y = (
                    f"{labels.method_label(a)} v{labels.versions(a)}",
                    f"{labels.method_label(b)} v{labels.versions(b)}",
                )
            out.append(f"{name}: {x} vs {y}")
    return out


def compare(a: Loaded, b: Loaded) -> Comparison:
    out = Comparison(sources=(a.sources, b.sources), problems=a.problems + b.problems)
    ka = {like_key(r): r for r in a.ok}
    kb = {like_key(r): r for r in b.ok}
    for k, ra in ka.items():
        if k in kb:
            out.pairs.append(Pair(ra, kb[k], metric_deltas(ra, kb[k])))
    # A cell without its like on the other side, but with cells of the same model, method and
    # task there, is "not comparable" (with the fields that differ), not merely missing.
    for ra in (r for k, r in ka.items() if k not in kb):
        near = [rb for rb in kb.values() if loose_key(rb) == loose_key(ra)]
        out.not_comparable += [(ra, rb, differing(ra, rb)) for rb in near]
        if not near:
            out.only_a.append(ra)
    for rb in (r for k, r in kb.items() if k not in ka):
        near = [ra for ra in ka.values() if loose_key(ra) == loose_key(rb)]
        out.not_comparable += [(ra, rb, differing(ra, rb)) for ra in near if like_key(ra) in kb]
        if not near:
            out.only_b.append(rb)
    out.failed = [("A", r) for r in a.failed] + [("B", r) for r in b.failed]
    return out


def parse_rule(text: str) -> tuple[str, float, bool]:
    """``METRIC=TOL`` -> (metric, tolerance, relative). ``perplexity=2%`` or ``decode_tokens_per_s=5``."""
    metric, sep, tol = text.partition("=")
    if not sep or not metric.strip() or not tol.strip():
        raise ValueError(f"--fail-if-worse expects METRIC=TOL (TOL a number, or a percentage like 2%), got {text!r}")
    relative = tol.strip().endswith("%")
    try:
        value = float(tol.strip().rstrip("%"))
    except ValueError:
        raise ValueError(f"--fail-if-worse {text!r}: tolerance {tol!r} is not a number") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"--fail-if-worse {text!r}: tolerance must be a finite number >= 0")
    return metric.strip(), value / 100 if relative else value, relative


def rule_matches(rule_metric: str, pair: Pair, d: Delta) -> bool:
    """``metric`` matches that metric of every task; ``task/metric`` only that task's."""
    task, _, metric = rule_metric.rpartition("/")
    return d.metric == metric and (not task or task == pair.a["task"]["name"])


def regressions(cmp: Comparison, rules: list[str]) -> tuple[list[str], list[str]]:
    """(regressions, rules that matched no compared metric), each in words."""
    found, unmatched = [], []
    for text in rules:
        metric, tol, relative = parse_rule(text)
        hits = [(p, d) for p in cmp.pairs for d in p.deltas if rule_matches(metric, p, d)]
        if not hits:
            unmatched.append(text)
        for p, d in hits:
            size = abs(d.relative) if relative else abs(d.delta)
            if d.worse and size > tol and not (d.noise and d.noise["within_noise"]):
                allowed = f"{tol:.2%}" if relative else fmt(tol)
                found.append(
                    f"{cell_name(p.a)}: {d.metric} {fmt(d.a)} -> {fmt(d.b)} ({signed(d.delta)} {d.unit}, "
                    f"{signed(100 * d.relative)}%), worse than allowed {allowed}"
                )
    return found, unmatched


def cell_name(rec: dict[str, Any]) -> str:
    return f"{rec['model']['name']} | {labels.method_label(rec)} | {rec['task']['name']}@{rec['task'].get('version')}"


def signed(v: float) -> str:
    return ("+" if v > 0 else "") + fmt(v)


def noise_words(d: Delta) -> str:
    if d.noise is None:
        return "no noise estimate (one value per side)"
    verdict = "≈ within noise" if d.noise["within_noise"] else "beyond noise"
    return f"{verdict}: [{fmt(d.noise['ci_low'])}, {fmt(d.noise['ci_high'])}], {d.noise['how']}"


def table_rows(cmp: Comparison) -> list[list[str]]:
    rows = []
    for p in cmp.pairs:
        for d in p.deltas:
            mark = "worse" if d.worse and not (d.noise and d.noise["within_noise"]) and d.delta else ""
            rows.append(
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
                    mark,
                ]
            )
    return rows


HEAD = ["cell", "hardware", "metric", "A", "B", "Δ (B - A)", "unit", "Δ %", "noise", ""]


def markdown(cmp: Comparison) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(md_text(c) for c in cells) + " |"

    md = [
        "# SlimBench comparison",
        "",
        f"A: {', '.join(md_text(s) for s in cmp.sources[0])}  ",
        f"B: {', '.join(md_text(s) for s in cmp.sources[1])}",
        "",
        "Only like with like: same model, method config and version, task version and parameters, and hardware "
        "class. Noise: paired bootstrap where per-example scores exist, else the spread of repeats.",
        "",
        f"## Compared cells ({len(cmp.pairs)})",
        "",
        row(HEAD),
        "|" + "---|" * len(HEAD),
    ]
    md += [row(r) for r in table_rows(cmp)]
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


def html(cmp: Comparison) -> str:
    def table(head: list[str], rows: list[list[str]]) -> str:
        return (
            "<table><tr>"
            + "".join(f"<th>{h(c)}</th>" for c in head)
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f'<td class="{h(head[i] or "mark")}">{h(c)}</td>' for i, c in enumerate(r)) + "</tr>"
                for r in rows
            )
            + "</table>"
        )

    def items(recs: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{h(x)}</li>" for x in recs) + "</ul>"

    body = [
        "<h1>SlimBench comparison</h1>",
        f"<p>A: {h(', '.join(cmp.sources[0]))}<br>B: {h(', '.join(cmp.sources[1]))}</p>",
        f"<h2>Compared cells ({len(cmp.pairs)})</h2>",
        table(HEAD, table_rows(cmp)),
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
    css = (
        "body{font:14px system-ui,sans-serif;margin:20px}table{border-collapse:collapse;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 6px}td.mark{color:#b03a2e;font-weight:600}"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>SlimBench comparison</title><style>{css}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
