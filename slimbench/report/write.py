"""Every output of a report at once: leaderboard (Markdown, CSV, LaTeX), plots and the HTML page."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from slimbench.report import formats, records, serving, table
from slimbench.report.escape import reveal
from slimbench.sweep.store import ResultStore, atomic_write_text


@dataclass
class ReportOutput:
    folder: Path
    files: list[Path]
    summary: str
    problems: list[str] = field(default_factory=list)


def console_table(lb: table.Leaderboard, cols: list[str]) -> str:
    """The summary for the terminal: numbers as in the Markdown ('–' for none), timing flags beside
    their values, invisible characters in names revealed, a legend under it when a flag is shown."""
    shown = [[reveal(formats.cell_text(lb, r, c)) for c in cols] for _, r in lb.df.iterrows()]
    head = [reveal(c) for c in cols]
    widths = [max(len(x) for x in col) for col in zip(head, *shown, strict=True)]
    numeric = [c not in ("model", "method", "execution") for c in cols]

    def line(cells: list[str]) -> str:
        return "  ".join(x.rjust(w) if num else x.ljust(w) for x, w, num in zip(cells, widths, numeric, strict=True))

    out = [line(head).rstrip()] + [line(r).rstrip() for r in shown]
    flags = sorted({f for _, r in lb.df.iterrows() for c in cols if (f := lb.flag(r, c))})
    if flags:
        out.append(
            f"({' / '.join(flags)}: a timing that is not a result: taken while other processes used the cores, "
            "or with fewer repeats than its protocol asks; see the report's timing flags)"
        )
    return "\n".join(out)


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
    serving_drawn = []
    if lb is not None and plots:
        from slimbench.report.serving_plots import write_serving_plots

        serving_drawn = write_serving_plots(loaded.ok, out)
    files = [out / "leaderboard.md"]
    md = formats.markdown_report(lb, loaded, drawn)
    section = serving.markdown_section(loaded.ok, serving_drawn)
    atomic_write_text(files[0], md + ("\n" + section if section else ""))
    if lb is not None:
        for name, text in (("leaderboard.csv", formats.csv_report(lb)), ("leaderboard.tex", formats.latex_report(lb))):
            atomic_write_text(out / name, text)
            files.append(out / name)
    if html:
        from slimbench.report.html import html_report

        atomic_write_text(out / "report.html", html_report(lb, loaded, drawn))
        files.append(out / "report.html")
    files += [p.path for p in drawn] + [p.path for p in serving_drawn]
    if plots:  # long-context tasks: heat maps by length x depth, KV bytes vs accuracy (their own page)
        from slimbench.report.long_context import write_long_context

        files += write_long_context(loaded.ok, out)
    if lb is None:
        summary = "no ok records to report"
    else:
        cols = [
            c
            for c in lb.columns()
            if c in ("model", "method", "execution", "stored MB")
            or (c == "sparsity" and (lb.df[c] > 0).any())
            or c.split(" [")[0] == "decode tok/s"
            or c in {q.col for q in lb.quality}
            or c.startswith("Δ ")
        ]
        summary = console_table(lb, cols)
    summary += f"\n\nreport: {files[0]} ({len(drawn) + len(serving_drawn)} plots)"
    if html:
        summary += f"; {out / 'report.html'}"
    if loaded.failed:
        summary += f"; {len(loaded.failed)} failed cell(s) listed there"
    for p in loaded.problems:
        summary += f"\nwarning: skipped {p}"
    return ReportOutput(out, files, summary, loaded.problems)
