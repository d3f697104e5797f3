"""`run SUITE`: run every cell of a suite (cells with an ok record are skipped)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimbench.errors import SuiteError


def positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive ({what}), got {text}")
        return value

    return parse


def build_executor(args: argparse.Namespace):
    """The executor the options ask for (nothing started yet)."""
    memory_limit = int(args.memory_limit * 2**30) if args.memory_limit else None
    if args.executor == "ray":
        from slimbench.sweep.executors.ray_executor import RayExecutor  # imports Ray only here

        return RayExecutor(address=args.address, max_groups=args.workers, memory_limit=memory_limit,
                           timeout=args.timeout)
    from slimbench.sweep.executors import LocalExecutor

    workers = args.workers
    if workers is None and (args.isolate or args.timeout is not None):
        workers = 1  # a group can only be cut off (timeout) or kept apart (isolate) in its own process
    return LocalExecutor(workers, isolate=args.isolate, timeout=args.timeout, memory_limit=memory_limit)


def report_is_current(store, out: Path) -> bool:
    md = out / "leaderboard.md"
    if not md.exists():
        return False
    files = store.record_files()
    return not files or md.stat().st_mtime >= max(p.stat().st_mtime for p in files)


def cmd_run(args: argparse.Namespace) -> int:
    from slimbench.sweep.store import ResultStore, check_results_folder
    from slimbench.sweep.suite import load_suite, validate_against_models

    if args.address and args.executor != "ray":
        raise SuiteError("--address names a Ray cluster; use it with --executor ray")
    # Every validation error happens here, before any work. The checks against each model's
    # shapes build a weightless skeleton (seconds of imports): only when a cell is left to run.
    suite = load_suite(args.suite, args.set, check_models=False)
    check_results_folder(args.results)
    cells = suite.cells()
    if args.quality_only:
        from slimbench.sweep.executors.resources import cell_is_timed

        timed = [c for c in cells if cell_is_timed(c)]
        cells = [c for c in cells if not cell_is_timed(c)]
        print(f"quality only: {len(timed)} timed cell(s) left out (run without --quality-only to measure them); "
              "no machine lock taken, so no waiting for other runs' timed cells")
    store = ResultStore(args.results)
    done = {c.run_id for c in cells if store.has_ok(c.run_id)}
    if len(done) < len(cells) or args.dry_run:
        validate_against_models(suite)
    for warning in suite.warnings:
        print(f"warning: {warning}")
    print(
        f"suite {suite.name}: {len(cells)} cells "
        f"({len(suite.models)} models x {len(suite.methods)} method configs x {len(suite.tasks)} tasks)"
        + (f"; {len(done)} already have an ok record and will be skipped" if done else "")
    )
    if args.dry_run:
        for c in cells:
            state = "done" if c.run_id in done else "todo"
            print(f"  {c.run_id}  {state}  {c.model.name} | {c.method.label()} | {c.task.label()}")
        return 0
    report_dir = Path(args.report_dir or Path(args.results) / "report")
    if len(done) == len(cells):  # the fast path: no executor, no model, no worker
        print(f"nothing to run: every cell has an ok record in {store.runs}")
        return finish(args, store, report_dir, ran=False)
    from slimbench.sweep.artifacts import cache as artifacts
    from slimbench.sweep.store import utc_now

    artifacts.configure(args.artifacts, disabled=args.no_artifact_cache)  # workers inherit it (environment)
    artifacts.preflight()  # a full or read-only cache folder: said now, before any cell
    started = utc_now()
    summary = run_suite(args, suite, cells, store)
    print(
        f"ok {len(summary.ok)}, failed {len(summary.failed)}, skipped (already ok) {len(summary.skipped)}"
        + (f", finished by another run {len(summary.elsewhere)}" if summary.elsewhere else "")
        + f" -> {store.runs}"
    )
    from slimbench.sweep.artifacts.counts import counts_line, run_counts

    print(counts_line(run_counts(store.records(include_failed=True), started)))
    finish(args, store, report_dir, ran=True)
    return 1 if summary.failed else 0


def run_suite(args: argparse.Namespace, suite, cells, store):
    from slimbench.sweep.driver import sweep
    from slimbench.sweep.runner import units_of

    executor = build_executor(args)
    pending = [c for c in cells if not store.has_ok(c.run_id)]
    try:
        executor.start()  # connects to Ray, if asked: an unreachable cluster stops here
        executor.check(units_of(pending, interleave=not args.no_interleave))  # a request nobody can meet stops here
    except BaseException:
        executor.close()
        raise
    print(f"executor: {executor.name}")
    from slimbench.sweep.runner import RunOptions

    options = RunOptions(lock_timeout=args.lock_timeout, use_lock=not args.quality_only,
                         interleave=not args.no_interleave)
    return sweep(
        cells,
        store,
        executor,
        suite_source=suite.source,
        show_progress=not args.no_progress,
        claim_timeout=args.claim_timeout,
        options=options,
    )


def finish(args: argparse.Namespace, store, report_dir: Path, *, ran: bool) -> int:
    if args.no_report:
        return 0
    if not ran and report_is_current(store, report_dir):
        print(f"report: {report_dir / 'leaderboard.md'} is up to date")
        return 0
    from slimbench.report.write import write_report

    out = write_report(store, report_dir)
    print(out.summary)
    return 0


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
    r.add_argument("suite", help="suite YAML file, or the name of a built-in suite (quickstart, tiny, ...)")
    r.add_argument("--results", default="results", help="results folder (default: results)")
    add_set_option(r)
    r.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done, run nothing")
    r.add_argument("--no-report", action="store_true", help="do not write the leaderboard after the run")
    r.add_argument("--report-dir", help="where the report goes (default: RESULTS/report)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (default); ray: groups as Ray tasks (needs the ray extra)",
    )
    r.add_argument(
        "--workers",
        type=positive(int, "a number of processes"),
        metavar="N",
        help="local: N worker processes (default: run in this process, one group after another); "
        "ray: at most N groups at once",
    )
    r.add_argument(
        "--address",
        help="ray: address of a running Ray cluster (host:port, or auto); default: start a local Ray for the run",
    )
    r.add_argument(
        "--isolate",
        action="store_true",
        help="run each model x method group in a fresh process (own memory; a crash fails only its cells)",
    )
    r.add_argument(
        "--timeout",
        type=positive(float, "seconds"),
        metavar="SECONDS",
        help="kill a group after this long (runs groups in worker processes)",
    )
    r.add_argument(
        "--memory-limit",
        type=positive(float, "GiB"),
        metavar="GIB",
        help="memory a worker may use before its cell fails (default: 90%% of RAM shared by the workers; "
        "hardware.memory_gb, where set, wins)",
    )
    from slimbench.sweep.cell_claims import TIMEOUT_S

    r.add_argument(
        "--claim-timeout",
        type=positive(float, "seconds"),
        default=TIMEOUT_S,
        metavar="SECONDS",
        help=f"take over a cell claimed by a run on another host after its heartbeat is this old "
        f"(default {TIMEOUT_S:g}; a dead run on this host is taken over at once)",
    )
    r.add_argument(
        "--artifacts",
        metavar="DIR",
        help="cache of compressed models reused across runs (default: $SLIMBENCH_ARTIFACTS, "
        "else ~/.cache/slimbench/artifacts); see docs/artifacts.md",
    )
    r.add_argument("--no-artifact-cache", action="store_true", help="compress every group afresh, save nothing")
    r.add_argument(
        "--lock-timeout",
        type=positive(float, "seconds"),
        metavar="SECONDS",
        help="fail a cell whose stage waited this long for the machine lock (other SlimBench runs' timed cells "
        "hold it); waited once per run: later stages only try the lock. Default: wait as long as it takes, "
        "saying on whom on the progress bar and in `status`",
    )
    r.add_argument(
        "--quality-only",
        action="store_true",
        help="run only the untimed cells, without the machine lock: never waits for other runs' timed cells "
        "(whose measurements may then see this run's load and be flagged noisy)",
    )
    r.add_argument(
        "--no-interleave",
        action="store_true",
        help="keep every (model, method) group apart (more parallel with --workers) instead of measuring the "
        "timed cells of one model interleaved; their records say they were measured alone",
    )
    r.set_defaults(fn=cmd_run)
