"""`search-table`: searched (`auto`) against uniform configurations at equal stored bytes."""

from __future__ import annotations

import argparse

from slimbench.errors import SuiteError


def cmd_search_table(args: argparse.Namespace) -> int:
    from slimbench.methods.search.compare import collect, render
    from slimbench.sweep.store import ResultStore

    store = ResultStore(args.results)
    if not store.runs.exists():
        raise SuiteError(f"no results folder {store.runs}; run a suite first", source=args.results)
    print(render(collect(store.records(), split=args.split), tolerance=args.tolerance))
    return 0


def register(sub) -> None:
    s = sub.add_parser("search-table", help="print searched vs uniform configurations, wins and hypervolumes")
    s.add_argument("--results", default="results", help="results folder (default: results)")
    s.add_argument("--split", default="test", help="perplexity split compared (default: test)")
    s.add_argument("--tolerance", type=float, default=1e-4, help="relative bytes counted as equal (headers)")
    s.set_defaults(fn=cmd_search_table)
