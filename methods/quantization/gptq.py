"""`gptq`: GPTQ (Frantar et al., 2022), after IST-DASLab's reference ``gptq.py``.

Per linear layer: stream the Hessian ``H = 2/n * sum x xᵀ`` of its calibration inputs
(``add_batch``), then quantize the weight column by column on the shared grid, spreading each
column's rounding error over the not-yet-quantized columns with the inverse-Hessian Cholesky
factor (lazy batch updates of ``block_size`` columns). Layers are visited by the shared
layer-wise loop (true-sequential within a decoder layer), so each layer sees the outputs of the
already-quantized ones.

Choices, matching the reference unless stated:

- damping: ``percdamp * mean(diag H)`` added to the diagonal; dead inputs (``H_ii = 0``) get
  ``H_ii = 1`` and a zero weight column.
- ``act_order``: columns are processed in order of decreasing ``H_ii``.
- groups: a dynamic group's scale/zero is found when the quantizer reaches its first column.
  ``group_grid: reference`` (default) computes it as the reference does, from the weights as of
  the start of the current lazy-batch block (``W[:, j:j+groupsize]``: earlier blocks' error
  feedback applied, this block's not yet); ``updated`` uses the block's up-to-date columns
  instead (this module's behaviour before version 2; measured to raise layer output error
  slightly on every real layer tried). The two differ only for groups that start inside a block
  (``group_size`` not a multiple of ``block_size``).
- act-order: ``static_groups: false`` (default) is the reference's semantics: groups are runs of
  ``group_size`` columns *in act-order* (their grids follow ``group_grid`` too), so a column's
  group is recorded in ``g_idx`` (stored, int16 per input channel, counted in the bytes).
  ``static_groups: true`` (AutoGPTQ, also in the reference) fixes every group's grid from the
  original weights in natural order before quantizing, so ``group_grid`` does not apply, no
  ``g_idx`` is needed and the packed int4 kernel can execute it.
- one remaining difference: a per-channel grid (no groups) is found after dead input columns
  were zeroed (the reference finds it before), so a dead column never widens the grid. It only
  matters when an input channel is exactly zero on every calibration token.
- the Hessian is streamed per calibration sample in the reference's order; linears fed the
  very same input (q/k/v, gate/up) share one ``x xᵀ`` product (bit-identical to recomputing it).

With an identity Hessian no error is propagated and the result is exactly RTN's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from slimbench.methods.quantization.grid import (
    GridConfig,
    QuantParams,
    check_group_size,
    dequantize,
    find_params,
    quantize,
)
from slimbench.methods.quantization.packed import FormatConfig, finish_layer, format_report

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import HessianStream, SharedGram, adapter_for, sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears


class GPTQConfig(GridConfig, FormatConfig, CalibrationConfig):
    percdamp: float = Field(0.01, gt=0, le=1, description="damping as a fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, le=8192, description="columns per lazy-batch block")
    act_order: bool = Field(False, description="quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = Field(False, description="with act_order: fix group grids up front (no g_idx)")
    true_sequential: bool = Field(True, description="quantize a layer's linear groups one after another")
    group_grid: Literal["reference", "updated"] = Field(
        "reference",
        description="dynamic groups starting inside a block: grid from the block-start weights (reference) "
        "or from the block's updated columns",
    )

    @model_validator(mode="after")
    def _static_needs_groups(self):
        if self.static_groups and self.group_size is None:
            raise ValueError("static_groups needs a group_size (per-channel grids are static already)")
        if self.group_grid == "updated" and (self.group_size is None or self.static_groups):
            raise ValueError("group_grid: updated only applies to dynamic groups (a group_size, static_groups false)")
        return self


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [out, in] integer codes, natural column order
    params: QuantParams  # scale/zero [out, groups]
    g_idx: torch.Tensor | None  # [in] group of each input column (act-order dynamic groups only)
    weight: torch.Tensor  # [out, in] dequantized


def prepare_hessian(w: torch.Tensor, h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero dead columns, then the damped Hessian (copies; the inputs are untouched)."""
    w, h = w.clone().float(), h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    return w, h


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (the reference's ``Hinv``)."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the column loop on one thread.

    The loop is thousands of tiny ops; with 2 threads each op pays an OpenMP barrier, and on a
    shared, oversubscribed CPU those barriers dominate: measured 26.6 s (2 threads) vs 1.3 s
    (1 thread) for a 1536x576 weight while other jobs were running.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig) -> GPTQResult:
    """Quantize ``w`` [out, in] given the Hessian ``h`` [in, in] of its inputs."""
    with single_thread():
        return _gptq_quantize(w, h, cfg)


def _gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig) -> GPTQResult:
    rows, cols = w.shape
    gs = cfg.group_size
    w, h = prepare_hessian(w, h, cfg.percdamp)
    static: list[QuantParams] = []
    if gs is not None and cfg.static_groups:  # grids from the original weights, natural order
        static = [find_params(w[:, g : g + gs], cfg.bits, cfg.symmetric) for g in range(0, cols, gs)]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if cfg.act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_cholesky(h)
    codes = torch.zeros_like(w)
    p = find_params(w, cfg.bits, cfg.symmetric) if gs is None else None
    group_params: list[QuantParams] = []  # dynamic groups, in processing order
    col_group = torch.zeros(cols, dtype=torch.long)  # group of each processed (permuted) column
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs is not None:
                if static:
                    p = static[int(perm[col]) // gs]
                    col_group[col] = int(perm[col]) // gs
                elif col % gs == 0:
                    group_params.append(find_params(group_segment(w, w1, col, i, i2, gs, cfg), cfg.bits, cfg.symmetric))
                    p = group_params[-1]
                if not static:
                    col_group[col] = len(group_params) - 1
            q = quantize(w1[:, i : i + 1], p)
            codes[:, col] = q[:, 0]
            err = (w1[:, i] - dequantize(q, p)[:, 0]) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return assemble(codes, perm, col_group, p, static or group_params, cfg)


def group_segment(w: torch.Tensor, w1: torch.Tensor, col: int, i: int, i2: int, gs: int,
                  cfg: GPTQConfig) -> torch.Tensor:
    """The weights a dynamic group's grid is computed from, when the quantizer reaches its first
    column ``col`` (``i`` inside the block ``w1`` that ends at ``i2``).

    ``w`` holds every column as of the start of the current block (blocks update the columns
    after them lazily, at their end), ``w1`` the block's columns with the updates made so far in
    this block. The reference reads ``w``; ``updated`` reads the block's own columns from ``w1``.
    The two differ only when the group starts inside a block (``col`` not a multiple of
    ``block_size``); columns after the block are the same in both.
    """
    if cfg.group_grid == "reference":
        return w[:, col : col + gs]
    return torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs]


def assemble(codes: torch.Tensor, perm: torch.Tensor, col_group: torch.Tensor, p: QuantParams | None,
             groups: list[QuantParams], cfg: GPTQConfig) -> GPTQResult:
    """Undo the act-order permutation and gather the grids into [out, groups] tensors."""
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    if cfg.group_size is None:
        params, g_idx, cols = p, None, torch.zeros(codes.shape[1], dtype=torch.long)
    else:
        scale = torch.cat([g.scale for g in groups], dim=1)
        zero = torch.cat([g.zero for g in groups], dim=1)
        params = QuantParams(scale, zero, cfg.bits, cfg.symmetric)
        cols = col_group[inv]
        # natural-order groups need no index; act-order dynamic groups do
        g_idx = None if torch.equal(cols, torch.arange(codes.shape[1]) // cfg.group_size) else cols
    weight = params.scale[:, cols] * (codes - params.zero[:, cols])
    return GPTQResult(codes, params, g_idx, weight)


class GPTQLayer(HessianStream):
    """One linear layer's GPTQ state for the layer-wise loop (IST-DASLab's ``GPTQ`` object); the
    Hessian needs inputs only (``needs_output`` False: the loop may skip the output)."""

    def __init__(self, model, name: str, module, cfg: GPTQConfig, gram: SharedGram | None = None):
        self.model, self.name, self.module, self.cfg = model, name, module, cfg
        self.start_hessian(get_weight(module).shape[1], gram)

    def compress(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        w, h = get_weight(self.module).float(), self.hessian()
        res = gptq_quantize(w, h, self.cfg)
        # proxy loss tr((W - Q) H (W - Q)ᵀ) on the calibration inputs: what GPTQ minimises
        d = w - res.weight
        err = float(torch.einsum("ij,jk,ik->", d, h, d))
        stored = finish_layer(self.model, self.name, res.codes, res.params, self.cfg.group_size, self.cfg.format,
                              res.g_idx)
        self.h = None  # free the Hessian
        return {"stored": stored, "error": err, "g_idx": res.g_idx is not None, "seconds": time.perf_counter() - t0}


def check(lm, cfg: GPTQConfig) -> None:
    adapter_for(lm.model)  # raises with the supported model types
    check_group_size({n: get_weight(m).shape[1] for n, m in iter_linears(lm.model)}, cfg.group_size)


def apply(lm, cfg: GPTQConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    t0 = time.perf_counter()
    gram = SharedGram()
    results = sequential(
        lm.model, calib, lambda name, mod: GPTQLayer(lm.model, name, mod, cfg, gram),
        true_sequential=cfg.true_sequential, device=lm.device, progress=getattr(ctx, "progress", None),
    )
    storage = {f"{n}.weight": r["stored"] for n, r in results.items() if r["stored"] is not None}
    execution, notes, fmt = format_report(lm.model, cfg.format)
    errors = {n: r["error"] for n, r in results.items()}
    return MethodReport(
        execution=execution,
        storage=storage,
        details={
            "bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric, "act_order": cfg.act_order,
            "static_groups": cfg.static_groups, "group_grid": cfg.group_grid,
            "g_idx_layers": sum(r["g_idx"] for r in results.values()),
            "percdamp": cfg.percdamp, "block_size": cfg.block_size, "layers": len(results),
            "calibration": info, "loop_seconds": time.perf_counter() - t0,
            "quantize_seconds": sum(r["seconds"] for r in results.values()),
            "proxy_error_sum": sum(errors.values()), "proxy_error_max_layer": max(errors, key=errors.get),
            **fmt,
        },
        notes=notes,
    )


METHOD = Method(
    name="gptq",
    family="quantization",
    description="GPTQ: Hessian-aware column-wise quantization with error feedback (act-order, groups, damping)",
    config=GPTQConfig,
    apply=apply,
    check=check,
    calibration_need="hessian",
    # 2: dynamic group grids from the block-start weights, as in the reference (group_grid);
    # numbers change for grouped configs whose groups start inside a block, no others.
    version="2",
)
