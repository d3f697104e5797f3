"""The online Hadamard transforms of QuaRot / QuIP# against the linear layer they sit in front of.

Part of `make bench`; alone, on an idle machine, one thread:
    make bench BENCH_ARGS=benchmarks/bench_hadamard.py
Widths are SmolLM2-135M's (down_proj input 1,536 = 12 x 128, hidden 576 = 36 x 16) and Gemma 3's
(hidden 640 = 20 x 32, down_proj input 2,048); 1 token is decode, 128 tokens a prefill chunk.
"""

from __future__ import annotations

import pytest
import torch
from slimbench.methods.quantization.hadamard import hadamard_matmul, hadamard_plan

CASES = [(1536, 576), (576, 576), (640, 640), (2048, 640)]  # (transform width, linear output width)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("tokens", [1, 128])
@pytest.mark.parametrize("width,out", CASES)
def bench_fast_hadamard(benchmark, width, out, tokens):
    plan = hadamard_plan(width)
    factor = plan.dense_factor()
    x = torch.randn(tokens, width)
    benchmark.group = f"{width}->{out} x{tokens}"
    benchmark(hadamard_matmul, x, plan, factor)


@pytest.mark.parametrize("tokens", [1, 128])
@pytest.mark.parametrize("width,out", CASES)
def bench_linear_it_precedes(benchmark, width, out, tokens):
    lin = torch.nn.Linear(width, out, bias=False)
    x = torch.randn(tokens, width)
    benchmark.group = f"{width}->{out} x{tokens}"
    with torch.no_grad():
        benchmark(lin, x)
