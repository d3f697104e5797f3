"""`compare A B`: two results folders side by side, like with like, deltas with their noise.

Exit status: 0 no regression (or no rule); 1 a compared metric got worse than a rule allows,
beyond its noise; 2 a malformed rule, or a rule whose metric no compared cell has (answered with
the closest metric names before anything is printed); 3 a rule met only metrics it may not judge:
noisy or under-sampled timings, or a record that contradicts its own data (``--allow-noisy``
judges such timings anyway).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimbench.errors import SuiteError

EXIT_REGRESSION, EXIT_BAD_RULE, EXIT_NOT_JUDGED = 1, 2, 3


def cmd_compare(args: argparse.Namespace) -> int:
    from slimbench.cli.report import stores
    from slimbench.report import compare, compare_render, records
    from slimbench.sweep.store import atomic_write_text

    try:  # bad rules fail before anything is read
        for rule in args.fail_if_worse:
            compare.parse_rule(rule)
    except ValueError as exc:
        raise SuiteError(str(exc)) from None  # the message names the option and the rule once
    a, b = (records.load(stores([folder])) for folder in (args.a, args.b))
    cmp = compare.compare(a, b)
    unknown = compare.unknown_rules(cmp, args.fail_if_worse)
    if unknown:  # before any table: a misspelt metric must not scroll away under 88 rows
        raise SuiteError("\n".join(unknown))
    md = compare_render.markdown(cmp, all_rows=args.all_metrics)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "compare.md", md)
        atomic_write_text(out / "compare.html", compare_render.html(cmp, all_rows=args.all_metrics))
    print(md)
    if args.out:
        print(f"written: {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.html'}")
    if not args.fail_if_worse:
        return 0
    verdict = compare.judge(cmp, args.fail_if_worse, allow_noisy=args.allow_noisy)
    for line in verdict.regressions:
        print(f"REGRESSION {line}")
    for line in verdict.refused:
        print(f"NOT JUDGED {line}")
    if verdict.regressions:
        return EXIT_REGRESSION
    if verdict.refused:
        print(
            f"not judged: {len(verdict.refused)} comparison(s) above are not results; "
            f"{verdict.judged} judged without a regression (exit {EXIT_NOT_JUDGED})"
        )
        return EXIT_NOT_JUDGED
    print(f"no regression beyond the tolerances ({', '.join(args.fail_if_worse)})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two results folders (like with like, deltas with noise)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="results folder A (the reference)")
    p.add_argument("b", metavar="B", help="results folder B (compared against A; deltas are B - A)")
    p.add_argument("--out", help="write compare.md and compare.html into this folder")
    p.add_argument(
        "--fail-if-worse",
        action="append",
        default=[],
        metavar="METRIC=TOL",
        help="exit 1 if METRIC (or TASK/METRIC) got worse by more than TOL (absolute, or relative: 2%%) "
        "beyond its noise; exit 2 if no compared cell has METRIC; exit 3 if it only met noisy or "
        "under-sampled timings",
    )
    p.add_argument(
        "--allow-noisy",
        action="store_true",
        help="let --fail-if-worse judge noisy or under-sampled timings (by default it refuses: exit 3)",
    )
    p.add_argument("--all-metrics", action="store_true", help="also list metrics identical on both sides")
    p.set_defaults(fn=cmd_compare)
