"""`list methods|tasks|models|corpora`: what is registered, with parameters and defaults."""

from __future__ import annotations

import argparse


def cmd_list(args: argparse.Namespace) -> int:
    from slimbench.listing import render

    print(render(args.what))
    return 0


def register(sub) -> None:
    li = sub.add_parser("list", help="list registered methods, tasks, models or corpora")
    li.add_argument("what", choices=["methods", "tasks", "models", "corpora"])
    li.set_defaults(fn=cmd_list)
