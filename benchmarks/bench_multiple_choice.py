"""The multiple-choice engine (shared context, KV cache, batched continuations) against a plain
one-request-per-forward loop on the same ``shakespeare-cloze`` examples (4 choices each)."""

from __future__ import annotations

import pytest
from slimbench.tasks import multiple_choice as mc
from slimbench.tasks import shakespeare_cloze as sc

EXAMPLES = 8


@pytest.fixture(scope="module")
def examples():
    return sc.build(sc.ClozeConfig(n_examples=EXAMPLES))


@pytest.fixture(scope="module")
def scored() -> dict:
    return {}


@pytest.mark.parametrize("path", ["plain", "engine"])
def bench_multiple_choice(benchmark, loaded, examples, scored, path):
    if path == "engine":
        fn = lambda: mc.score(loaded, examples, batch_size=16)
    else:
        fn = lambda: mc.score_plain(loaded, examples)
    benchmark.group = f"multiple choice, {EXAMPLES} cloze examples x 4 choices"
    scored[path] = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    if len(scored) == 2:  # both paths must give the same log-likelihoods and decisions
        a, b = scored["engine"], scored["plain"]
        diff = max(abs(x - y) for xs, ys in zip(a.loglikelihoods, b.loglikelihoods, strict=True)
                   for x, y in zip(xs, ys, strict=True))
        benchmark.extra_info.update(max_abs_loglikelihood_diff=diff)
        assert diff < 1e-3 and a.acc == b.acc
