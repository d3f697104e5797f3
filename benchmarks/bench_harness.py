"""The perplexity task against a bare forward loop on the same windows (``benchmark.py speed``
runs the same code interleaved and prints the ratio)."""

from __future__ import annotations

import pytest

from slimbench.devtools.selfbench import bare_loop
from slimbench.registry import CORPORA, TASKS
from slimbench.specs import HardwareSpec
from slimbench.task import TaskContext

WINDOWS, SEQLEN = 4, 256


@pytest.fixture(scope="module")
def windows(loaded):
    from slimbench.tasks.perplexity import JOIN
    from slimbench.tasks.perplexity import windows as make_windows

    return make_windows(loaded.encode(JOIN.join(CORPORA.get("shakespeare").texts("test"))), SEQLEN, WINDOWS)


def bench_perplexity_bare_loop(benchmark, loaded, windows):
    benchmark.group = f"perplexity {WINDOWS} x {SEQLEN} tokens"
    benchmark.pedantic(bare_loop, args=(loaded.model, windows), rounds=3, warmup_rounds=1)


def bench_perplexity_task(benchmark, loaded, windows, threads):
    task = TASKS.get("perplexity")
    cfg = task.config(seqlen=SEQLEN, max_windows=WINDOWS)
    ctx = TaskContext(hardware=HardwareSpec(threads=threads))
    benchmark.group = f"perplexity {WINDOWS} x {SEQLEN} tokens"
    res = benchmark.pedantic(task.evaluate, args=(loaded, cfg, ctx), rounds=3, warmup_rounds=1)
    assert res.metrics["perplexity"].value > 1
