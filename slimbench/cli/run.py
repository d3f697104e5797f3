"""`run SUITE`: run every cell of a suite (cells with an ok record are skipped)."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from slimbench import artifacts
    from slimbench.store import utc_now

    artifacts.configure(args.artifacts, disabled=args.no_artifact_cache)
    artifacts.preflight()  # a full or read-only cache folder: said now, before any cell
    started = utc_now()
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
    print(artifacts.counts_line(artifacts.run_counts(store.records(include_failed=True), started)))
    if not args.no_report:
        from slimbench.report import write_report

        out = write_report(store, Path(args.report_dir or Path(args.results) / "report"))
        print(out.summary)
    return 1 if summary.failed else 0


def add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a suite field, value as YAML: hardware.threads=1, tasks.0.max_windows=8",
    )


def register(sub) -> None:
    r = sub.add_parser("run", help="run every cell of a suite (skips cells that already have an ok record)")
    r.add_argument("suite", help="suite YAML file, e.g. configs/quickstart.yaml")
    r.add_argument("--results", default="results", help="results folder (default: results)")
    add_set_option(r)
    r.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done, run nothing")
    r.add_argument("--no-report", action="store_true", help="do not write the leaderboard after the run")
    r.add_argument("--report-dir", help="where the report goes (default: RESULTS/report)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--isolate",
        action="store_true",
        help="run each model x method group in a fresh process (own memory; a crash fails only its cells)",
    )
    r.add_argument(
        "--artifacts",
        metavar="DIR",
        help="cache of compressed models reused across runs (default: $SLIMBENCH_ARTIFACTS, "
        "else ~/.cache/slimbench/artifacts); see docs/artifacts.md",
    )
    r.add_argument("--no-artifact-cache", action="store_true", help="compress every group afresh, save nothing")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="kill a group after this long (implies --isolate)")
    r.set_defaults(fn=cmd_run)
