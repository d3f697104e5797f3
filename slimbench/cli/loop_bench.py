"""`loop-bench`: benchmark of the layer-wise calibration loop, as first written vs now."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_loop_bench(args: argparse.Namespace) -> int:
    from slimbench.devtools.loopbench import VARIANTS, loop_bench

    variants = tuple(args.variants.split(","))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: --variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = loop_bench(method=args.method, suite=args.suite or None, samples=args.samples, seqlen=args.seqlen,
                     threads=args.threads, variants=variants, model=args.model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    same = all(r.get("bit_identical", True) for r in out["runs"].values())
    return 0 if same else 1


def register(sub) -> None:
    s = sub.add_parser("loop-bench", help="benchmark: the layer-wise calibration loop, first version vs now")
    s.add_argument("--method", default="gptq", help="a calibrated method (gptq, sparsegpt, wanda, awq, asvd, ...)")
    s.add_argument("--suite", default="configs/gptq_cost.yaml",
                   help="method config, model and threads from this suite's entry of --method ('' for defaults)")
    s.add_argument("--samples", type=int, help="calibration sequences (default: the suite's)")
    s.add_argument("--seqlen", type=int, help="tokens per calibration sequence (default: the suite's)")
    s.add_argument("--threads", type=int, help="torch threads (default: the suite's)")
    s.add_argument("--model", help="model (default: the suite's first)")
    s.add_argument("--variants", default="fast,reference",
                   help="comma-separated, run in this order: fast, reference, and ablations of fast: "
                   "no-memo, no-early-stop, no-share, no-triangle")
    s.add_argument("--json", help="also write the figures to this file")
    s.set_defaults(fn=cmd_loop_bench)
