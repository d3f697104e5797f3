"""`reproduce NAME|--all`: a paper's headline (where reachable) and its claim card, with verdicts."""

from __future__ import annotations

import argparse
import sys

from slimbench.errors import SuiteError


def cmd_reproduce(args: argparse.Namespace) -> int:
    from slimbench.reproduce import papers as rp
    from slimbench.reproduce import render as rp_render
    from slimbench.reproduce import run as rp_run
    from slimbench.reproduce.online import HubUnavailable

    if args.list:
        for key in rp.available_papers():
            paper = rp.load_paper(key)
            print(f"{key:12s} {paper.spec.paper.citation}: {paper.spec.claim.statement}")
        return 0
    names = rp.available_papers() if args.all else args.names
    if not names:
        raise SuiteError("name a paper (`reproduce gptq`), or give --all or --list", source="reproduce")
    papers = [rp.load_paper(n, args.set) for n in names]  # every file is validated before anything runs
    hardware = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("threads", args.threads)) if v}
    reps, unavailable = [], []
    for paper in papers:
        try:
            rep = rp_run.reproduce(
                str(paper.path),
                budget=args.budget,
                results=args.results,
                hardware=hardware,
                overrides=args.set,
                dry_run=args.dry_run,
                progress=not args.no_progress,
                isolate=args.isolate,
            )
        except HubUnavailable as err:
            if len(papers) == 1:
                raise
            # With several papers, one whose models cannot be fetched (a gated Llama-2) stops only itself.
            print(f"error: {paper.key}: {err}", file=sys.stderr)
            unavailable.append(paper.key)
            continue
        print(rp_render.render(rep, markdown=False))
        if not args.dry_run:
            print(f"(written to {rp_render.write_outputs(rep, args.results)})\n")
        reps.append(rep)
    if len(reps) > 1:
        table = rp_render.summary_table(reps)
        print(table)
        if not args.dry_run:
            from pathlib import Path

            from slimbench.sweep.store import atomic_write_text

            path = Path(args.results) / "reproduce" / f"summary-{args.budget}.md"
            atomic_write_text(path, table)
            print(f"(summary written to {path})")
    sys.stdout.flush()
    if unavailable:
        print(f"error: not run (their models or data could not be fetched): {', '.join(unavailable)}",
              file=sys.stderr)
        return 2
    return max(r.exit_code() for r in reps)


def register(sub) -> None:
    r = sub.add_parser(
        "reproduce",
        help="reproduce a paper: its headline table where reachable, and its claim card on the embedded model",
        description=(
            "Runs what is reachable of a paper (configs/papers/NAME.yaml): the headline table with --budget paper "
            "when its models and data sets are available, and the claim card (the paper's qualitative claim as "
            "checks on the embedded model). Prints published vs measured and the verdict; exits 1 if a claim "
            "fails or a published number is missed, 2 on a config error."
        ),
    )
    r.add_argument("names", nargs="*", metavar="NAME", help="paper key (gptq, sparsegpt, ...) or a paper YAML file")
    r.add_argument("--all", action="store_true", help="every paper in configs/papers")
    r.add_argument("--list", action="store_true", help="list the papers and their claims")
    r.add_argument("--budget", choices=["small", "paper"], default="small",
                   help="small: the claim cards' benchmark budget; paper: the paper's calibration size, and the "
                   "headline where reachable (default: small)")
    r.add_argument("--results", default="results", help="results folder (default: results)")
    r.add_argument("--threads", type=int, help="override hardware.threads of the suites (part of the run id)")
    r.add_argument("--device", choices=["cpu", "cuda"], help="override hardware.device")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override hardware.dtype")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the paper file (value parsed as YAML), e.g. "
                   "headline.suite.models.0.revision=COMMIT or headline.suite.hardware.dtype=float16; repeatable")
    r.add_argument("--dry-run", action="store_true",
                   help="run nothing: say what is missing and show verdicts from records already stored")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--isolate", action="store_true", help="run each model x method group in a fresh process")
    r.set_defaults(fn=cmd_reproduce)
