"""`spqr`: SpQR (Dettmers et al., 2023) — small groups, quantized statistics, fp16 outliers, GPTQ's error feedback.

Per linear layer, inside GPTQ's column loop (the shared layer-wise loop streams the Hessian):

1. **Small groups.** Every ``group_size`` (β1 = 16) input columns, each output row gets its own
   asymmetric min-max grid (``bits``), fitted on the group's current (error-corrected) weights
   with the likely outliers replaced by the mean of the rest. Likely outliers are found as SpQR
   does: for each weight, the reduction of the group's Hessian-weighted rounding error when
   that one weight is left out of the fit (leave-one-out), above the threshold.
2. **Bilevel statistics.** A group's scales (one per row) and zero-points are themselves
   quantized, in runs of ``stats_group`` (β2 = 16) rows, to ``stats_bits`` (3) bits on a min-max
   grid whose scale and minimum are fp16. The weights are quantized with the decoded statistics.
3. **Unstructured outliers.** A weight whose Hessian-weighted error ``((w - q) / U_jj)²`` exceeds
   ``outlier_threshold × mean_j(Var(W_:j) / U_jj²)`` is kept in fp16, exactly; its error is then 0.
4. GPTQ's feedback of each column's error to the columns after it (lazy blocks of 128).

The stored form counts everything: packed codes, packed scale and zero codes, the fp16
second-level statistics, and the outliers in CSR (fp16 value + int16 column per outlier, an int32
row pointer per row); ``effective_bits`` is what that form weighs. With the defaults (3-bit
weights, β1 = β2 = 16) the paper's accounting gives 3 + 6/16 + 64/256 = 3.625 bits plus 32 bits
per outlier; ours adds the row pointers. Deviations: columns in natural order (SpQR may permute
by act-order), the statistics' grid spans their own [min, max] (no zero forced into it).
Execution ``simulated``: dense fp32 weights equal to what the form decodes to.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from slimbench.methods.quantization.gptq import inverse_cholesky, prepare_hessian, single_thread
from slimbench.methods.quantization.grid import check_group_size, pack_bits, unpack_bits

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import HessianStream, SharedGram, adapter_for, sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class SpQRConfig(CalibrationConfig):
    bits: int = Field(3, ge=2, le=8, description="bits per weight code")
    group_size: int = Field(16, ge=2, description="β1: input columns per weight group")
    stats_bits: int = Field(3, ge=2, le=8, description="bits of each group's quantized scale and zero-point")
    stats_group: int = Field(16, ge=2, description="β2: rows sharing one fp16 scale/min of the statistics")
    outlier_threshold: float = Field(0.2, gt=0, description="relative threshold τ (float('inf'): no outliers)")
    percdamp: float = Field(0.01, gt=0, le=1, description="Hessian damping, fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-batch block")


def min_max_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, low) fp16-rounded, per row of x, spanning the row's own [min, max]."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, lo.half().float()


def quantize_stats(v: torch.Tensor, bits: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level: v [out] in runs of ``rows`` -> (decoded v, codes [out], fp16 [runs, 2] scale/low)."""
    runs = v.reshape(-1, rows)
    scale, lo = min_max_grid(runs, bits)
    codes = torch.clamp(torch.round((runs - lo) / scale), 0, 2**bits - 1)
    return (codes * scale + lo).reshape(-1), codes.reshape(-1), torch.cat([scale, lo], 1).half()


def weight_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row min-max grid including 0 (as GPTQ's quantizer): (scale, zero) unrounded."""
    maxq = 2**bits - 1
    lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, -lo / scale


def fake_q(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, 2**bits - 1)
    return scale.unsqueeze(-1) * (q - zero.unsqueeze(-1))


def leave_one_out_gain(group: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, g]: how much the group's error Σ((w - q)/d)² drops when weight j is left out of the fit."""
    g = group.shape[1]
    idx = torch.arange(g)
    loo = torch.stack([torch.cat([idx[:j], idx[j + 1:]]) for j in range(g)])  # [g, g-1]
    data = group[:, loo]  # [out, g, g-1]
    flat = data.reshape(-1, g - 1)
    s, z = weight_grid(flat, bits)
    err_loo = ((fake_q(flat, s, z, bits) - flat) / d[loo].repeat(group.shape[0], 1)).square().sum(1)
    s, z = weight_grid(group, bits)
    err_base = ((fake_q(group, s, z, bits) - group) / d).square().sum(1, keepdim=True)
    return err_base - err_loo.view(group.shape[0], g)


def spqr_quantize(w: torch.Tensor, h: torch.Tensor, cfg: SpQRConfig) -> dict[str, Any]:
    with single_thread():
        return _spqr_quantize(w, h, cfg)


def _spqr_quantize(w: torch.Tensor, h: torch.Tensor, cfg: SpQRConfig) -> dict[str, Any]:
    rows, cols = w.shape
    gs, maxq = cfg.group_size, 2**cfg.bits - 1
    w, h = prepare_hessian(w, h, cfg.percdamp)
    u = inverse_cholesky(h)
    d = torch.diag(u)
    thr = cfg.outlier_threshold * float((w.var(dim=0) / d.square()).mean())
    codes = torch.zeros(rows, cols)
    outlier = torch.zeros(rows, cols, dtype=torch.bool)
    dense = torch.zeros(rows, cols)
    stats = {"scale_codes": [], "zero_codes": [], "scale_stats": [], "zero_stats": []}
    scale = zero = None
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                group = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :gs]  # this block's updated columns first
                if thr != float("inf"):
                    likely = leave_one_out_gain(group, d[col:col + gs], cfg.bits) > thr
                    keep = (~likely).float()
                    mean = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
                    group = group * keep + mean * (1 - keep)
                s_raw, z_raw = weight_grid(group, cfg.bits)
                scale, sc, ss = quantize_stats(s_raw, cfg.stats_bits, cfg.stats_group)
                zero, zc, zs = quantize_stats(z_raw, cfg.stats_bits, cfg.stats_group)
                scale = scale.clamp(min=1e-8)  # a scale that fp16 rounded to 0 (an all-zero group)
                for k, v in zip(stats, (sc, zc, ss, zs), strict=True):
                    stats[k].append(v)
            x = w1[:, i]
            q = torch.clamp(torch.round(x / scale + zero), 0, maxq)
            deq = scale * (q - zero)
            e = (x - deq) / d[col]
            if thr != float("inf"):
                out = e.square() > thr
                deq = torch.where(out, x.half().float(), deq)
                outlier[:, col] = out
                e = (x - deq) / d[col]
            codes[:, col], dense[:, col] = q, deq
            w1[:, i:] -= e.unsqueeze(1) @ u[col, col:i2].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return {"codes": codes, "outlier": outlier, "dense": dense,
            **{k: torch.stack(v, 1) if v[0].dim() == 1 else torch.stack(v, 0) for k, v in stats.items()}}


def stored_form(res: dict[str, Any], cfg: SpQRConfig) -> dict[str, torch.Tensor]:
    """The checkpoint of one layer: codes, quantized statistics, fp16 outliers in CSR."""
    mask = res["outlier"]
    rows_idx, cols_idx = mask.nonzero(as_tuple=True)
    counts = mask.sum(1)
    return {
        "qweight": pack_bits(res["codes"], cfg.bits),
        "scale_codes": pack_bits(res["scale_codes"], cfg.stats_bits),  # [out, groups]
        "zero_codes": pack_bits(res["zero_codes"], cfg.stats_bits),
        "scale_stats": res["scale_stats"],  # [groups, out/β2, 2] fp16 scale and min
        "zero_stats": res["zero_stats"],
        "outlier_values": res["dense"][rows_idx, cols_idx].half(),
        "outlier_cols": cols_idx.to(torch.int16),
        "outlier_row_ptr": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32),
    }


def decode(form: dict[str, torch.Tensor], out_f: int, in_f: int, cfg: SpQRConfig) -> torch.Tensor:
    """The dense [out, in] weight a stored form stands for (the tests' independent reading)."""
    groups = in_f // cfg.group_size
    codes = unpack_bits(form["qweight"], cfg.bits, out_f * in_f).float().view(out_f, in_f)

    def stat(name: str) -> torch.Tensor:  # [out, groups]
        c = unpack_bits(form[f"{name}_codes"], cfg.stats_bits, out_f * groups).float().view(out_f, groups)
        st = form[f"{name}_stats"].float()  # [groups, runs, 2]
        sc = st[..., 0].t().repeat_interleave(cfg.stats_group, 0)
        lo = st[..., 1].t().repeat_interleave(cfg.stats_group, 0)
        return c * sc + lo

    scale, zero = stat("scale"), stat("zero")
    scale = scale.clamp(min=1e-8)
    cols = torch.arange(in_f) // cfg.group_size
    w = scale[:, cols] * (codes - zero[:, cols])
    ptr = form["outlier_row_ptr"].long()
    rows = torch.repeat_interleave(torch.arange(out_f), ptr[1:] - ptr[:-1])
    w[rows, form["outlier_cols"].long()] = form["outlier_values"].float()
    return w


class SpQRLayer(HessianStream):
    def __init__(self, module, cfg: SpQRConfig, gram: SharedGram):
        self.module, self.cfg = module, cfg
        self.start_hessian(get_weight(module).shape[1], gram)

    def compress(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        w = get_weight(self.module).float()
        h = self.hessian()
        res = spqr_quantize(w, h, self.cfg)
        set_weight(self.module, res["dense"])
        self.h = None
        return {"stored": stored_form(res, self.cfg), "outliers": int(res["outlier"].sum()), "numel": w.numel(),
                "seconds": time.perf_counter() - t0}


def check(lm, cfg: SpQRConfig) -> None:
    adapter_for(lm.model)
    shapes = {n: get_weight(m).shape for n, m in iter_linears(lm.model)}
    check_group_size({n: s[1] for n, s in shapes.items()}, cfg.group_size)
    bad = [n for n, s in shapes.items() if s[0] % cfg.stats_group]
    if bad:
        raise ValueError(f"stats_group {cfg.stats_group} does not divide the output dimension "
                         f"{shapes[bad[0]][0]} of layer {bad[0]}")


def apply(lm, cfg: SpQRConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    t0 = time.perf_counter()
    gram = SharedGram()
    results = sequential(lm.model, calib, lambda name, mod: SpQRLayer(mod, cfg, gram), device=lm.device,
                         progress=getattr(ctx, "progress", None))
    outliers = sum(r["outliers"] for r in results.values())
    numel = sum(r["numel"] for r in results.values())
    return MethodReport(
        execution="simulated",
        storage={f"{n}.weight": r["stored"] for n, r in results.items()},
        details={"code_bits": cfg.bits, "group_size": cfg.group_size, "stats_bits": cfg.stats_bits,
                 "stats_group": cfg.stats_group, "outlier_threshold": cfg.outlier_threshold,
                 "outliers": outliers, "outlier_fraction": outliers / max(numel, 1),
                 "paper_bits": cfg.bits + 2 * cfg.stats_bits / cfg.group_size
                 + 64 / (cfg.group_size * cfg.stats_group) + 32 * outliers / max(numel, 1),
                 "layers": len(results), "calibration": info, "loop_seconds": time.perf_counter() - t0,
                 "quantize_seconds": sum(r["seconds"] for r in results.values())},
        notes=["fake-quant: dense weights equal to the stored form's decoding (codes, quantized statistics, "
               "fp16 outliers)"],
    )


METHOD = Method(
    name="spqr",
    family="quantization",
    description="SpQR: GPTQ with small groups, 3-bit quantized statistics and unstructured fp16 outliers (CSR)",
    config=SpQRConfig,
    apply=apply,
    check=check,
    calibration_need="hessian",
)
