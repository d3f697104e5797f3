"""Benchmark (not a test): the multiple-choice engine vs a plain one-request-at-a-time loop.

    python -m tasks._mc_throughput --model smollm2-135m --examples 24 --rounds 3 --threads 1

Both score the same ``shakespeare-cloze`` examples (4 choices each). After one untimed warm-up
of each, the two are timed alternately for ``rounds`` rounds (so a load change on a shared
machine hits both alike); the device is synchronised before every clock read. Reports
examples/s of each (median of rounds, raw samples kept), their ratio, and the largest
log-likelihood difference between the two (they must agree to float tolerance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from slimbench.tasks import multiple_choice as mc
from slimbench.tasks import shakespeare_cloze as sc

from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.zoo.models import resolve


def timed(fn, lm) -> tuple[float, mc.Scored]:
    lm.synchronize()
    t0 = time.perf_counter()
    out = fn()
    lm.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hw = HardwareSpec(threads=args.threads)
    spec = ModelSpec(name=args.model)
    lm = resolve(spec, source="cli", field="model")(spec, hw)
    exs = sc.build(sc.ClozeConfig(n_examples=args.examples))
    fast = lambda: mc.score(lm, exs, batch_size=args.batch_size)
    plain = lambda: mc.score_plain(lm, exs)
    mc.score(lm, exs[:2])  # warm-up, untimed
    mc.score_plain(lm, exs[:2])
    t_fast, t_plain = [], []
    for _ in range(args.rounds):
        s, plain_out = timed(plain, lm)
        t_plain.append(s)
        s, fast_out = timed(fast, lm)
        t_fast.append(s)
    diff = max(abs(a - b) for x, y in zip(fast_out.loglikelihoods, plain_out.loglikelihoods, strict=True)
               for a, b in zip(x, y, strict=True))
    n = len(exs)
    report = {
        "model": args.model, "threads": args.threads, "examples": n, "requests": n * 4, "rounds": args.rounds,
        "engine_examples_per_s": n / statistics.median(t_fast), "plain_examples_per_s": n / statistics.median(t_plain),
        "engine_seconds": t_fast, "plain_seconds": t_plain,
        "speedup": statistics.median(t_plain) / statistics.median(t_fast),
        "max_abs_loglikelihood_diff": diff,
        "same_decisions": fast_out.acc == plain_out.acc and fast_out.acc_norm == plain_out.acc_norm,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
