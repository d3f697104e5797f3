"""`validate SUITE`: check a suite without running anything."""

from __future__ import annotations

import argparse

from slimbench.cli.run import add_set_option


def cmd_validate(args: argparse.Namespace) -> int:
    from slimbench.sweep.suite import load_suite

    suite = load_suite(args.suite, args.set)
    print(f"{suite.source}: valid, {len(suite.cells())} cells")
    for warning in suite.warnings:
        print(f"warning: {warning}")
    return 0


def register(sub) -> None:
    v = sub.add_parser("validate", help="validate a suite without running it")
    v.add_argument("suite")
    add_set_option(v)
    v.set_defaults(fn=cmd_validate)
