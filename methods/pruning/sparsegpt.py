"""`sparsegpt` (Frantar & Alistarh, ICML 2023): OBS mask selection with weight reconstruction.

Per linear layer, from the calibration Hessian ``H = 2 X Xᵀ / n`` (streamed like the authors'
``add_batch``), following IST-DASLab's ``fasterprune``:

1. dead input channels (zero Hessian diagonal) are zeroed; damping ``percdamp · mean(diag H)``;
2. ``Hinv`` = the upper Cholesky factor of ``H⁻¹``;
3. columns are processed in blocks of ``blocksize``. Unstructured: at the start of each block
   the mask is chosen from ``w² / [Hinv]_jj²`` over the whole block (lowest pruned). N:M: at the
   start of each group of M columns, the M−N lowest of each row's group are pruned;
4. column by column, the pruned (and, with ``bits``, quantized) value replaces the weight and
   the error ``(w − q) / [Hinv]_jj`` is spread over the remaining columns of the block, then
   lazily over the rest of the matrix.

Deviation, so the achieved sparsity equals the target exactly: a block's mask prunes exactly
``round(sparsity · block numel)`` weights (``topk``), where the authors' threshold
``tmp <= sort(tmp)[int(numel · sparsity)]`` prunes one more (and any ties).
Joint quantization (``bits``) uses the shared grid: per output row, min-max found on the
weight before pruning, as the authors do.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from slimbench.methods.pruning.common import pruning_report
from slimbench.methods.pruning.masks import SparsityConfig, check_layerwise_pruning, mask_lowest
from slimbench.methods.quantization.grid import QuantParams, dequantize, find_params, quantize

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, set_weight


class SparseGPTConfig(SparsityConfig, CalibrationConfig):
    blocksize: int = Field(128, ge=1, le=65536, description="columns per lazy-update block (mask block)")
    percdamp: float = Field(0.01, ge=0.0, le=1.0, description="damping as a fraction of mean(diag H)")
    bits: int | None = Field(None, ge=2, le=8, description="jointly quantize the kept weights to this many bits")
    symmetric: bool = Field(False, description="symmetric grid for joint quantization")
    # The authors' loop hooks every linear of a decoder layer in one pass (no true-sequential).
    true_sequential: bool = Field(False, description="re-run each layer after pruning each linear group")


def hessian_inverse_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (the authors' ``Hinv``)."""
    h = h.clone()
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h, upper=True)


def fasterprune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: QuantParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``w`` [out, in] given ``h`` [in, in]: (new weight, keep-mask, summed OBS loss)."""
    w = w.clone().float()
    h = h.clone().float()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = hessian_inverse_factor(h, percdamp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    losses = torch.zeros(rows)
    if nm is not None and blocksize % nm[1]:
        blocksize = nm[1] * max(1, blocksize // nm[1])  # a block never splits an N:M group
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1, loss1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
        d1 = torch.diag(hinv1)
        if nm is None:
            score = w1**2 / d1.reshape(1, -1) ** 2
            mask1 = ~mask_lowest(score, round(sparsity * score.numel()))
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i : i + m] ** 2 / d1[i : i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False).indices, True)
            q = col.clone()
            q[mask1[:, i]] = 0
            if quant is not None:
                q = dequantize(quantize(q.unsqueeze(1), quant), quant).flatten()
            q1[:, i] = q
            loss1[:, i] = (col - q) ** 2 / d1[i] ** 2
            err = (col - q) / d1[i]
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        losses += loss1.sum(dim=1) / 2
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    keep = ~pruned
    w = w * keep  # dead channels and pruned weights are exact zeros
    return w, keep, float(losses.sum())


class SparseGPTLayer:
    """Streams ``H = 2/n Σ x xᵀ`` (the authors' running average), then prunes the layer."""

    def __init__(self, module: torch.nn.Module, cfg: SparseGPTConfig):
        self.module, self.cfg = module, cfg
        cols = get_weight(module).shape[1]
        self.h = torch.zeros(cols, cols, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.float().cpu()
        n = x.shape[0]
        self.h *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = (2 / self.nsamples) ** 0.5 * x
        self.h += x.t() @ x

    def compress(self) -> dict[str, Any]:
        w0 = get_weight(self.module).float().cpu()
        quant = find_params(w0, self.cfg.bits, self.cfg.symmetric) if self.cfg.bits else None
        w, keep, loss = fasterprune(
            w0, self.h, self.cfg.sparsity, self.cfg.nm, self.cfg.blocksize, self.cfg.percdamp, quant
        )
        set_weight(self.module, w.to(get_weight(self.module).device))
        del self.h
        pruned = int((~keep).sum())
        return {
            "pruned": pruned,
            "numel": keep.numel(),
            "sparsity": pruned / keep.numel(),
            "obs_loss": loss,
            "quant": quant,
        }


@torch.no_grad()
def apply(lm, cfg: SparseGPTConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    make = lambda name, mod: SparseGPTLayer(mod, cfg)
    stats = sequential(
        lm.model, calib, make, true_sequential=cfg.true_sequential, device=lm.device, progress=ctx.progress
    )
    quant = {n: s.pop("quant") for n, s in stats.items()}
    extra = {
        "calibration": info,
        "blocksize": cfg.blocksize,
        "percdamp": cfg.percdamp,
        "joint_quantization": {"bits": cfg.bits, "symmetric": cfg.symmetric, "grid": "per output row"}
        if cfg.bits
        else None,
        "obs_loss_total": sum(s["obs_loss"] for s in stats.values()),
    }
    return pruning_report(lm, cfg, stats, extra, quant if cfg.bits else None)



METHOD = Method(
    name="sparsegpt",
    family="pruning",
    description="SparseGPT: OBS pruning with weight reconstruction, unstructured or N:M, optional joint b-bit",
    config=SparseGPTConfig,
    apply=apply,
    check=check_layerwise_pruning,
    calibration_need="hessian",
)
