"""`speed`: benchmark of the perplexity task's throughput against a bare forward loop."""

from __future__ import annotations

import argparse


def cmd_speed(args: argparse.Namespace) -> int:
    from slimbench.devtools.selfbench import perplexity_overhead

    perplexity_overhead(model=args.model, windows=args.windows, seqlen=args.seqlen, rounds=args.rounds)
    return 0


def register(sub) -> None:
    s = sub.add_parser("speed", help="benchmark: perplexity task throughput vs a bare forward loop")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--windows", type=int, default=8)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--rounds", type=int, default=3)
    s.set_defaults(fn=cmd_speed)
