#!/usr/bin/env python
"""SlimBench command line: run suites, list the registry, write reports.

python benchmark.py run configs/quickstart.yaml            # run every cell (resumes)
python benchmark.py run SUITE --set tasks.0.max_windows=8  # override a suite field
python benchmark.py validate SUITE                         # check a suite, run nothing
python benchmark.py list methods|tasks|models|corpora      # what is registered
python benchmark.py report --results results               # leaderboard + Pareto plots
python benchmark.py speed                                  # harness vs bare-loop throughput
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# No hub traffic by default: everything SlimBench ships runs offline. Users who want hub
# models export HF_HUB_OFFLINE=0 themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slimbench.errors import SuiteError


def cmd_run(args: argparse.Namespace) -> int:
    from slimbench.runner import run_cells
    from slimbench.store import ResultStore
    from slimbench.suite import load_suite

    suite = load_suite(args.suite, args.set)  # every validation error happens here, before any work
    cells = suite.cells()
    store = ResultStore(args.results)
    done = sum(store.has_ok(c.run_id) for c in cells)
    print(
        f"suite {suite.name}: {len(cells)} cells "
        f"({len(suite.models)} models x {len(suite.methods)} method configs x {len(suite.tasks)} tasks)"
        + (f"; {done} already have an ok record and will be skipped" if done else "")
    )
    if args.dry_run:
        for c in cells:
            state = "done" if store.has_ok(c.run_id) else "todo"
            print(f"  {c.run_id}  {state}  {c.model.name} | {c.method.label()} | {c.task.label()}")
        return 0
    summary = run_cells(
        cells,
        store,
        suite_source=suite.source,
        show_progress=not args.no_progress,
        isolate=args.isolate or args.timeout is not None,
        timeout=args.timeout,
    )
    print(
        f"ok {len(summary.ok)}, failed {len(summary.failed)}, skipped (already ok) {len(summary.skipped)}"
        f" -> {store.runs}"
    )
    if not args.no_report:
        from slimbench.report import write_report

        out = write_report(store, Path(args.report_dir or Path(args.results) / "report"))
        print(out.summary)
    return 1 if summary.failed else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from slimbench.suite import load_suite

    suite = load_suite(args.suite, args.set)
    print(f"{suite.source}: valid, {len(suite.cells())} cells")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from slimbench.listing import render

    print(render(args.what))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slimbench.report import write_report
    from slimbench.store import ResultStore

    store = ResultStore(args.results)
    if not store.runs.exists():
        raise SuiteError(f"no results folder {store.runs}; run a suite first", source=args.results)
    out = write_report(store, Path(args.out or Path(args.results) / "report"))
    print(out.summary)
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from slimbench.selfbench import perplexity_overhead

    perplexity_overhead(model=args.model, windows=args.windows, seqlen=args.seqlen, rounds=args.rounds)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every cell of a suite (skips cells that already have an ok record)")
    r.add_argument("suite", help="suite YAML file, e.g. configs/quickstart.yaml")
    r.add_argument("--results", default="results", help="results folder (default: results)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a suite field, value as YAML: hardware.threads=1, tasks.0.max_windows=8",
    )
    r.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done, run nothing")
    r.add_argument("--no-report", action="store_true", help="do not write the leaderboard after the run")
    r.add_argument("--report-dir", help="where the report goes (default: RESULTS/report)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--isolate",
        action="store_true",
        help="run each model x method group in a fresh process (own memory; a crash fails only its cells)",
    )
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="kill a group after this long (implies --isolate)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="validate a suite without running it")
    v.add_argument("suite")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=cmd_validate)

    li = sub.add_parser("list", help="list registered methods, tasks, models or corpora")
    li.add_argument("what", choices=["methods", "tasks", "models", "corpora"])
    li.set_defaults(fn=cmd_list)

    rp = sub.add_parser("report", help="write leaderboard.md/.csv and Pareto plots from stored records")
    rp.add_argument("--results", default="results", help="results folder (default: results)")
    rp.add_argument("--out", help="output folder (default: RESULTS/report)")
    rp.set_defaults(fn=cmd_report)

    s = sub.add_parser("speed", help="benchmark: perplexity task throughput vs a bare forward loop")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--windows", type=int, default=8)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--rounds", type=int, default=3)
    s.set_defaults(fn=cmd_speed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
