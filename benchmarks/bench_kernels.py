"""Packed int8 / int4 weight kernels and dynamic int8 against dense fp32 and bf16, per linear.

Shapes are SmolLM2-135M's decoder linears; ``tokens`` 1 is a decode step, 128 a prefill. Every
path computes the same product (checked against fp32 before timing), so within a group the
ratio of medians is the kernel's speed-up on this machine.

    make bench                                      # everything, compared with the last run
    .venv/bin/python -m pytest benchmarks/bench_kernels.py -o python_files='bench_*.py' -k decode
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from slimbench.methods.quantization.dynamic_int8 import DynamicInt8Linear
from slimbench.methods.quantization.grid import GridConfig, quantize_matrix
from slimbench.methods.quantization.packed import PackedLinear

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)}
TOKENS = {"decode": 1, "prefill": 128}


def packed(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> PackedLinear:
    codes, _, params = quantize_matrix(w, GridConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    layer = PackedLinear.from_codes(codes, params, group_size, None)
    assert layer.kernel == ("int8pack" if bits == 8 else "int4pack"), layer.kernel
    return layer


def build(path: str, w: torch.Tensor):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    if path == "dense-fp32":
        return lin
    if path == "dense-bf16":
        wb = w.bfloat16()
        return lambda x: F.linear(x.bfloat16(), wb).float()
    if path == "int8-weight-packed":
        return packed(w, 8, None, True)
    if path == "int4-g64-packed":
        return packed(w, 4, 64, False)
    if path == "dynamic-int8":
        return DynamicInt8Linear.from_linear(lin)
    raise ValueError(path)


PATHS = ("dense-fp32", "dense-bf16", "int8-weight-packed", "int4-g64-packed", "dynamic-int8")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("phase", list(TOKENS))
@pytest.mark.parametrize("shape", list(SHAPES))
def bench_linear(benchmark, threads, shape, phase, path):
    torch.manual_seed(0)
    out_f, in_f = SHAPES[shape]
    w = torch.randn(out_f, in_f) / in_f**0.5
    x = torch.randn(TOKENS[phase], in_f)
    fn = build(path, w)
    with torch.inference_mode():
        ref, got = F.linear(x, w), fn(x).float()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 0.2, f"{path} disagrees with fp32 by {err:.3f} (relative)"  # 4-bit codes: ~0.1
        benchmark.group = f"{shape} {phase} ({TOKENS[phase]} x {in_f} -> {out_f})"
        benchmark.extra_info.update(relative_error=err, threads=threads)
        benchmark(fn, x)
