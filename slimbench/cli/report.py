"""`report`: leaderboard (Markdown, CSV) and Pareto plots from stored records."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimbench.errors import SuiteError


def cmd_report(args: argparse.Namespace) -> int:
    from slimbench.report import write_report
    from slimbench.store import ResultStore

    store = ResultStore(args.results)
    if not store.runs.exists():
        raise SuiteError(f"no results folder {store.runs}; run a suite first", source=args.results)
    out = write_report(store, Path(args.out or Path(args.results) / "report"))
    print(out.summary)
    return 0


def register(sub) -> None:
    rp = sub.add_parser("report", help="write leaderboard.md/.csv and Pareto plots from stored records")
    rp.add_argument("--results", default="results", help="results folder (default: results)")
    rp.add_argument("--out", help="output folder (default: RESULTS/report)")
    rp.set_defaults(fn=cmd_report)
