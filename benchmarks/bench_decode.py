"""Greedy decode at batch 1 through SlimBench's execution paths: eager fp32 against bf16, dynamic
int8 and packed int4 (compiled paths cost a minute of warm-up each: ``accel-bench`` measures
those, interleaved, with the efficiency task's protocol)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimbench.method import apply_method
from slimbench.specs import HardwareSpec
from slimbench.sweep.suite import Problems, parse_methods

PROMPT, NEW = 64, 32
PATHS = {
    "eager-fp32": ["baseline"],
    "eager-bf16": [{"name": "cast", "dtype": "bfloat16"}],
    "dynamic-int8": ["dynamic-int8"],
    "int4-g64-packed": [{"name": "rtn", "bits": 4, "group_size": 64, "format": "packed"}],
}


@pytest.fixture(scope="module")
def prompt(loaded):
    from slimbench.registry import CORPORA

    text = "\n\n".join(CORPORA.get("shakespeare").texts("test"))
    return torch.tensor(loaded.encode(text)[:PROMPT]).unsqueeze(0)


@pytest.mark.parametrize("path", list(PATHS))
def bench_decode(benchmark, loaded, prompt, threads, path):
    problems = Problems("bench_decode")
    spec = parse_methods([PATHS[path]], "bench_decode", problems)[0]
    problems.raise_if_any()
    lm = copy.deepcopy(loaded)
    apply_method(lm, spec, HardwareSpec(threads=threads))
    benchmark.group = f"greedy decode, batch 1, {PROMPT}-token prompt + {NEW} new tokens"
    with torch.inference_mode():
        out = benchmark.pedantic(lm.generate, args=(prompt, NEW), rounds=3, warmup_rounds=1)
    if benchmark.stats:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info.update(new_tokens=NEW, tokens_per_s_median=NEW / benchmark.stats.stats.median)
    assert out.shape[-1] >= NEW
