"""Every output of a report at once: leaderboard (Markdown, CSV, LaTeX), plots and the HTML page."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from slimbench.report import formats, records, table
from slimbench.report.formatting import fmt
from slimbench.sweep.store import ResultStore, atomic_write_text


@dataclass
class ReportOutput:
    folder: Path
    files: list[Path]
    summary: str
    problems: list[str] = field(default_factory=list)


def write_report(
    stores: ResultStore | Iterable[ResultStore], out: Path, *, html: bool = False, plots: bool = True
) -> ReportOutput:
    loaded = records.load(stores)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lb = table.build(loaded.ok) if loaded.ok else None
    drawn = []
    if lb is not None and plots:
        from slimbench.report.plots import write_plots

        drawn = write_plots(lb, out)
    files = [out / "leaderboard.md"]
    atomic_write_text(files[0], formats.markdown_report(lb, loaded, drawn))
    if lb is not None:
        for name, text in (("leaderboard.csv", formats.csv_report(lb)), ("leaderboard.tex", formats.latex_report(lb))):
            atomic_write_text(out / name, text)
            files.append(out / name)
    if html:
        from slimbench.report.html import html_report

        atomic_write_text(out / "report.html", html_report(lb, loaded, drawn))
        files.append(out / "report.html")
    files += [p.path for p in drawn]
    if plots:  # long-context tasks: heat maps by length x depth, KV bytes vs accuracy (their own page)
        from slimbench.report.long_context import write_long_context

        files += write_long_context(loaded.ok, out)
    if lb is None:
        summary = "no ok records to report"
    else:
        cols = [
            c
            for c in lb.columns()
            if c in ("model", "method", "execution", "stored MB", "decode tok/s")
            or c in {q.col for q in lb.quality}
            or c.startswith("Δ ")
        ]
        summary = lb.df[cols].to_string(index=False, float_format=lambda v: fmt(float(v)))
    summary += f"\n\nreport: {files[0]} ({len(drawn)} plots)"
    if html:
        summary += f"; {out / 'report.html'}"
    if loaded.failed:
        summary += f"; {len(loaded.failed)} failed cell(s) listed there"
    for p in loaded.problems:
        summary += f"\nwarning: skipped {p}"
    return ReportOutput(out, files, summary, loaded.problems)
