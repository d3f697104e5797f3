"""A reproduction in words: Markdown and plain tables of published vs measured, and the verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimbench.report.escape import reveal
from slimbench.reproduce.run import Reproduction
from slimbench.sweep.store import atomic_write_text


# -- rendering ----------------------------------------------------------------------------
def md(text: Any) -> str:
    """A value made safe for a Markdown table cell (and for HTML rendering of it); invisible
    characters written out (``<U+202E>``) so no name can pose as another."""
    s = reveal(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def plain(text: Any) -> str:
    """A value for the terminal: one line, nothing escaped but invisible characters written out."""
    return reveal(str(text).replace("\r", " ").replace("\n", " "))


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) < 1000:
        return f"{v:.4g}"
    return f"{v:,.0f}" if abs(v) < 1e7 else f"{v:.3g}"


def render(rep: Reproduction, markdown: bool = True) -> str:
    """The reproduction as Markdown (escaped, for files) or as plain text for the terminal."""
    esc = md if markdown else plain
    info, card, head = rep.paper.spec.paper, rep.paper.spec.claim, rep.paper.spec.headline
    out = [f"## {esc(info.title)}", "", f"{esc(info.citation)}. {esc(info.url)}", ""]
    out += [f"### Headline: {esc(head.description)}", "", f"Protocol: {esc(head.protocol)}", ""]
    if rep.headline_missing:
        out += ["Not reachable here (what is missing):", ""]
        out += [f"- {esc(m.line())}" for m in rep.headline_missing] + [""]
    if head.deviations:
        out += ["Differences from the paper's code:", ""] + [f"- {esc(d)}" for d in head.deviations] + [""]
    out += ["| model | method | task | published | measured | tolerance | result |", "|---|---|---|---|---|---|---|"]
    for r in rep.headline_rows:
        out.append(f"| {esc(r.model)} | {esc(r.method)} | {esc(r.task)} | {fmt(r.published)} | {fmt(r.measured)} | "
                   f"{esc(r.tolerance.text())} | {esc(r.status)} |")
    verdict = rep.verdict.verdict.upper()
    out += ["", f"### Claim card ({esc(rep.claim_model)}, budget {esc(rep.budget)}): **{verdict}**", ""]
    out += [f"Claim tested: {esc(card.statement)}", "", f"The paper: {esc(card.paper_claim)}", ""]
    out += [f"Task: {esc(rep.claim_task)}; metric: {esc(card.metric)}.", ""]
    out += ["| arm | method | " + esc(card.metric) + " | run id / note |", "|---|---|---|---|"]
    for a in rep.arms:
        out.append(f"| {esc(a.arm)} | {esc(a.method)} | {fmt(a.value)} | {esc(a.note or a.run_id)} |")
    out += ["", "| role | check | measured | bound | result |", "|---|---|---|---|---|"]
    for c in rep.verdict.checks:
        res = {True: "pass", False: "FAIL", None: "n/a"}[c.passed]
        # measured and bound in one unit, the one the check's text uses (12.07x fp against >= 1.5x fp)
        bound = c.check.bound_shown(c.reference)
        out.append(f"| {c.check.role} | {esc(c.check.text)} | {esc(c.shown())} | {esc(bound)} | {res} |")
    if card.caveats:
        out += ["", "Caveats:", ""] + [f"- {esc(c)}" for c in card.caveats]
    if rep.notes:
        out += ["", "Notes:", ""] + [f"- {esc(n)}" for n in rep.notes]
    return "\n".join(out) + "\n"


def summary_table(reps: list[Reproduction]) -> str:
    out = ["| paper | claim tested on the embedded model | budget | verdict | headline |", "|---|---|---|---|---|"]
    for r in reps:
        if r.headline_missing:
            head = f"not reachable ({len(r.headline_missing)} missing)"
        else:
            head = f"{sum(x.status == 'pass' for x in r.headline_rows)}/{len(r.headline_rows)} within tolerance"
            if r.headline_missing_rows:
                head += f", {len(r.headline_missing_rows)} not measured"
        out.append(f"| {md(r.paper.key)} | {md(r.paper.spec.claim.statement)} | {md(r.budget)} | "
                   f"**{r.verdict.verdict}** | {md(head)} |")
    return "\n".join(out) + "\n"


def write_outputs(rep: Reproduction, results: str | Path) -> Path:
    """``RESULTS/reproduce/<key>-<budget>.md`` and ``.json``; returns the Markdown path."""
    folder = Path(results) / "reproduce"
    stem = f"{rep.paper.key}-{rep.budget}"
    atomic_write_text(folder / f"{stem}.json", json.dumps(rep.to_dict(), indent=1, sort_keys=True, default=str))
    path = folder / f"{stem}.md"
    atomic_write_text(path, render(rep))
    return path
