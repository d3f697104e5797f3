"""`new method NAME --family F [--plugin DIR]`: start a method from a documented template.

Without ``--plugin`` the file goes into the clone's ``methods/<family>/`` folder, where the
registry finds it; with ``--plugin DIR`` a plugin package skeleton is written (pyproject with
its dependency on slimbench and the ``slimbench.methods`` entry point, the method, a contract
test). Either way, ``check-method NAME`` passes on what was generated.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_new(args: argparse.Namespace) -> int:
    from slimbench.devtools import scaffold

    if args.plugin:
        paths = scaffold.write_plugin(args.name, args.family, Path(args.plugin), force=args.force)
        print(f"plugin package for {args.name} ({args.family}) in {args.plugin}:")
        for p in paths:
            print(f"  {p}")
        print(f"next: pip install -e {args.plugin} && slimbench check-method {args.name}")
    else:
        path = scaffold.write_method(args.name, args.family, scaffold.clone_methods_dir(), force=args.force)
        print(f"wrote {path}")
        print(f"next: python benchmark.py check-method {args.name}")
        print("docs/contributing.md walks from here to a leaderboard row")
    return 0


def register(sub) -> None:
    from slimbench.devtools.scaffold import TEMPLATE_FAMILIES

    p = sub.add_parser("new", help="write a documented method template (into methods/ or a plugin package)")
    p.add_argument("kind", choices=["method"], help="what to create")
    p.add_argument("name", help="the method's name, e.g. my-pruner")
    p.add_argument("--family", required=True, choices=TEMPLATE_FAMILIES, help="the method's family")
    p.add_argument("--plugin", metavar="DIR", help="write a plugin package skeleton into DIR instead of methods/")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(fn=cmd_new)
