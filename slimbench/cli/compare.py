"""`compare A B`: two results folders side by side, like with like, deltas with their noise."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimbench.errors import SuiteError


def cmd_compare(args: argparse.Namespace) -> int:
    from slimbench.cli.report import stores
    from slimbench.report import compare, records
    from slimbench.sweep.store import atomic_write_text

    try:  # bad rules fail before anything is read
        for rule in args.fail_if_worse:
            compare.parse_rule(rule)
    except ValueError as exc:
        raise SuiteError(str(exc), source="--fail-if-worse") from None
    a, b = (records.load(stores([folder])) for folder in (args.a, args.b))
    cmp = compare.compare(a, b)
    md = compare.markdown(cmp)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "compare.md", md)
        atomic_write_text(out / "compare.html", compare.html(cmp))
    print(md)
    if args.out:
        print(f"written: {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.html'}")
    if not args.fail_if_worse:
        return 0
    found, unmatched = compare.regressions(cmp, args.fail_if_worse)
    for rule in unmatched:
        print(f"error: --fail-if-worse {rule}: no compared cell has this metric, so nothing was checked")
    for line in found:
        print(f"REGRESSION {line}")
    if found:
        return 1
    if unmatched:
        return 2
    print(f"no regression beyond the tolerances ({', '.join(args.fail_if_worse)})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare two results folders (like with like, deltas with noise)")
    p.add_argument("a", metavar="A", help="results folder A (the reference)")
    p.add_argument("b", metavar="B", help="results folder B (compared against A; deltas are B - A)")
    p.add_argument("--out", help="write compare.md and compare.html into this folder")
    p.add_argument(
        "--fail-if-worse",
        action="append",
        default=[],
        metavar="METRIC=TOL",
        help="exit 1 if METRIC (or TASK/METRIC) got worse by more than TOL (absolute, or relative: 2%%) "
        "beyond its noise; exit 2 if no compared cell has METRIC",
    )
    p.set_defaults(fn=cmd_compare)
