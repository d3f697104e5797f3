"""`verify RESULTS [--rerun K]`: check a results folder someone sends in.

Reads the records as JSON data only (nothing in the folder is imported, unpickled or run):
schema, fields, run ids, metrics, environment, versions, duplicates and contradictions. With
``--rerun K`` it re-runs K sampled cells here and reports the ones that disagree beyond noise.
"""

from __future__ import annotations

import argparse

from slimbench.errors import SuiteError


def cmd_verify(args: argparse.Namespace) -> int:
    from slimbench.devtools.verify import rerun, verify_folder

    if args.rerun is not None and args.rerun < 0:
        raise SuiteError("--rerun must be 0 or more", source="verify")
    v = verify_folder(args.results)
    for finding in v.findings:
        print(finding)
    ok = sum(r["status"] == "ok" for r in v.records.values())
    print(f"{v.root}: {len(v.records)} records read ({ok} ok, {len(v.records) - ok} failed); "
          f"{len(v.errors)} error(s), {len(v.findings) - len(v.errors)} warning(s)")
    if args.rerun:
        rerun(v, args.rerun, seed=args.seed, rtol=args.rtol, timing_rtol=args.timing_rtol,
              log=lambda s: print(f"  {s}"))
        for r in v.reruns:
            detail = r.get("reason") or "; ".join(r.get("problems") or [])
            print(f"rerun {r['status']:8} {r['cell']}" + (f": {detail}" if detail else ""))
        agree = sum(r["status"] == "agree" for r in v.reruns)
        print(f"re-ran {len(v.reruns)} sampled cell(s): {agree} agree, {len(v.disagreements)} disagree, "
              f"{len(v.reruns) - agree - len(v.disagreements)} skipped")
    return 1 if v.errors or v.disagreements else 0


def register(sub) -> None:
    p = sub.add_parser("verify", help="check a results folder (schema, ids, environment, duplicates; --rerun K)")
    p.add_argument("results", help="results folder (holding runs/)")
    p.add_argument("--rerun", type=int, metavar="K", help="re-run K sampled ok cells here and compare")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample of cells to re-run")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of quality metrics and sizes")
    p.add_argument("--timing-rtol", type=float, default=0.5,
                   help="relative tolerance of latency/memory, compared only on the same CPU")
    p.set_defaults(fn=cmd_verify)
