"""`status RESULTS [--suite SUITE]`: done / running (owner) / waiting (for the machine lock, on whom) /
failed (reason) / pending, and an ETA (a running `run`'s own, else estimated for --workers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimbench.errors import SuiteError


def cmd_status(args: argparse.Namespace) -> int:
    from slimbench.sweep.cell_claims import ClaimBook
    from slimbench.sweep.status import CostModel, format_status, live_eta, remaining_seconds, suite_state
    from slimbench.sweep.store import ResultStore

    root = Path(args.results)
    if not root.is_dir():
        raise SuiteError(f"no results folder {root}; run a suite first (or give the folder it wrote)")
    store = ResultStore(root)
    cells = None
    if args.suite:
        from slimbench.sweep.suite import load_suite

        suite = load_suite(args.suite, args.set)
        cells = suite.cells()
        print(f"suite {suite.name} in {root}")
    else:
        print(f"{root} (every cell it holds; give --suite to see pending cells too)")
    rows = suite_state(store, cells, ClaimBook(store, timeout=args.claim_timeout))
    eta = live_eta(root)  # a run on this folder now: the same estimate its progress bar shows
    if eta is None and cells is not None:
        eta = remaining_seconds(cells, rows, CostModel.from_records(store.history()), workers=args.workers)
    print(format_status(rows, eta, verbose_done=args.all))
    if store.problems:
        print(f"{len(store.problems)} file(s) in {store.runs} are not readable records and were skipped (see above)")
    return 0


def register(sub) -> None:
    from slimbench.cli.run import add_set_option
    from slimbench.sweep.cell_claims import TIMEOUT_S

    s = sub.add_parser("status", help="which cells of a results folder are done, running, waiting, failed or pending")
    s.add_argument("results", nargs="?", default="results", help="results folder (default: results)")
    s.add_argument("--suite", help="suite YAML file: list its cells, pending ones included, with an ETA")
    add_set_option(s)
    s.add_argument("--all", action="store_true", help="list done cells too")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="the ETA of the cells no run is computing, for N workers (default 1); a running `run` "
                        "on the folder gives its own")
    s.add_argument(
        "--claim-timeout", type=float, default=TIMEOUT_S, metavar="SECONDS", help=argparse.SUPPRESS
    )
    s.set_defaults(fn=cmd_status)
