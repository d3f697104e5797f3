"""`hqq`: Half-Quadratic Quantization (Badri & Shaji, 2023) — calibration-free, per-group zero-points by a solver.

For each group of ``group_size`` input channels of a weight row, start from the min-max grid
(``scale = (2^b - 1) / (max - min)``, ``zero = -min · scale``; HQQ's convention ``W_q = round(W·scale + zero)``)
and improve the zero-point by half-quadratic splitting of ``min ‖W - W_r‖_p^p`` (``p = 0.7 < 1``,
robust to the heavy-tailed weight errors), alternating two closed-form steps:

    W_q = clamp(round(W·scale + zero), 0, 2^b - 1);   W_r = (W_q - zero) / scale
    W_e = shrink_p(W - W_r, β)   with shrink_p(x, β) = sign(x) · relu(|x| - |x|^(p-1) / β)
    zero = mean over the group of (W_q - (W - W_e) · scale)

stopping at the first iteration whose mean |W - W_r| does not improve (at most ``iters``). This
is the ``hqq`` package's default solver (``optimize_weights_proximal_legacy``, hqq 0.2.8),
re-implemented here so SlimBench does not depend on it; the tests compare codes, scales and
zero-points with the package's own ``Quantizer.quantize`` where it is installed. Scales and
zero-points are stored in fp16 (as HQQ keeps them); the zero-point is *not* an integer, so the
stored form holds ``zeros`` (fp16) instead of packed ``qzeros``: 0.5 bits per weight at g64.

No calibration data: the cost is a few passes over each weight, so it compresses in seconds.
Execution is ``simulated`` (fake-quantized dense weights; the stored form is counted).
"""

from __future__ import annotations

import time

import torch
from pydantic import Field
from slimbench.methods.quantization.grid import SCALE_DTYPE, check_group_size, pack_bits

from slimbench.config import Config
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class HQQConfig(Config):
    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int = Field(64, ge=8, description="input channels per scale/zero-point group (a power of two)")
    lp_norm: float = Field(0.7, gt=0, le=1, description="p of the ‖W - W_r‖_p^p objective")
    beta: float = Field(10.0, gt=0, description="half-quadratic penalty β")
    iters: int = Field(20, ge=1, le=1000, description="solver iterations at most (stops when the error rises)")
    optimize: bool = Field(True, description="false: plain min-max grid with fp16 zero-points (HQQ without solver)")
    round_zero: bool = Field(False, description="round the initial zero-point to an integer")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalized soft-threshold: argmin_e |e|^p + β/2 (e - x)² (approximately, as HQQ)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


@torch.no_grad()
def hqq_groups(w: torch.Tensor, cfg: HQQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """HQQ of ``w`` viewed as [groups, group_size]: (codes, scale (W_r = (W_q - zero) * scale), zero, iters run)."""
    maxq = 2**cfg.bits - 1
    wf = w.float().reshape(-1, cfg.group_size)
    lo, hi = wf.min(dim=1, keepdim=True).values, wf.max(dim=1, keepdim=True).values
    denom = hi - lo
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), maxq / denom).clamp(max=2e4)
    zero = -lo * inv
    if cfg.round_zero:
        zero = torch.round(zero)
    steps = 0
    if cfg.optimize:
        best = torch.tensor(float("inf"))
        for _ in range(cfg.iters):
            steps += 1
            wq = torch.round(wf * inv + zero).clamp(0, maxq)
            wr = (wq - zero) / inv
            we = shrink_lp(wf - wr, cfg.beta, cfg.lp_norm)
            zero = torch.mean(wq - (wf - we) * inv, dim=1, keepdim=True)
            err = (wf - wr).abs().mean()
            if err < best:
                best = err
            else:  # as the reference: stop, keeping the zero-point this step produced
                break
    codes = torch.round(wf * inv + zero).clamp(0, maxq)
    return codes, 1.0 / inv, zero, steps


def quantize_weight(w: torch.Tensor, cfg: HQQConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(dense weight on the fp16 grid, its stored form, solver iterations) of an [out, in] weight."""
    out_f, in_f = w.shape
    codes, scale, zero, steps = hqq_groups(w, cfg)
    s16, z16 = scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)
    dense = (s16.float() * (codes - z16.float())).view(out_f, in_f)
    form = {"qweight": pack_bits(codes.view(out_f, in_f), cfg.bits), "scales": s16.view(out_f, -1),
            "zeros": z16.view(out_f, -1)}
    return dense, form, steps


def check(lm, cfg: HQQConfig) -> None:
    if cfg.group_size & (cfg.group_size - 1):
        raise ValueError(f"group_size must be a power of two (got {cfg.group_size})")
    check_group_size({n: get_weight(m).shape[1] for n, m in iter_linears(lm.model)}, cfg.group_size)


def apply(lm, cfg: HQQConfig, ctx) -> MethodReport:
    t0 = time.perf_counter()
    storage, steps = {}, []
    for name, mod in iter_linears(lm.model):
        dense, form, n = quantize_weight(get_weight(mod), cfg)
        set_weight(mod, dense)
        storage[f"{name}.weight"] = form
        steps.append(n)
    return MethodReport(
        execution="simulated",
        storage=storage,
        details={"bits": cfg.bits, "group_size": cfg.group_size, "lp_norm": cfg.lp_norm, "beta": cfg.beta,
                 "optimize": cfg.optimize, "layers": len(steps), "solver_iters_mean": sum(steps) / max(len(steps), 1),
                 "solver_iters_max": max(steps, default=0), "quantize_seconds": time.perf_counter() - t0,
                 "calibration": None},
        notes=["calibration-free; fp16 scales and fp16 (non-integer) zero-points per group",
               "fake-quant: dequantized weights in a dense fp32 model"],
    )


METHOD = Method(
    name="hqq",
    family="quantization",
    description="HQQ: calibration-free half-quadratic solver for per-group zero-points (lp, p=0.7), 2-8 bits",
    config=HQQConfig,
    apply=apply,
    check=check,
    test_params={"group_size": 32, "bits": 3},
)
