"""`report`: leaderboard (Markdown, CSV, LaTeX, optionally HTML) and Pareto plots from stored records."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimbench.errors import SuiteError


def stores(folders: list[str]) -> list:
    """One store per results folder (repeats dropped); a folder without records is an error."""
    from slimbench.sweep.store import ResultStore

    out = []
    for f in dict.fromkeys(folders):
        store = ResultStore(f)
        if not store.runs.is_dir():
            raise SuiteError(f"no results folder {store.runs}; run a suite first", source=f)
        out.append(store)
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from slimbench.report.write import write_report

    folders = args.results or ["results"]
    out = write_report(stores(folders), Path(args.out or Path(folders[0]) / "report"), html=args.html)
    print(out.summary)
    return 0


def register(sub) -> None:
    rp = sub.add_parser("report", help="write the leaderboard (Markdown, CSV, LaTeX, --html) and Pareto plots")
    rp.add_argument(
        "--results",
        action="append",
        metavar="FOLDER",
        help="results folder; repeat to merge several (identical cells counted once; default: results)",
    )
    rp.add_argument("--out", help="output folder (default: the first results folder's report/)")
    rp.add_argument("--html", action="store_true", help="also write report.html: one self-contained page")
    rp.set_defaults(fn=cmd_report)
