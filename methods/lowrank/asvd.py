"""`asvd`: activation-aware SVD (Yuan et al., 2023).

Input channels that carry large activations matter more to the output, so the weight is
scaled by ``S = diag(mean_t |x_t|^alpha)`` (per input channel, from calibration inputs)
before the SVD: ``W S = U diag(s) V^T``, truncated to rank k, then ``S^{-1}`` is folded back
into the right factor (``W ~= U_k diag(s_k) (V_k^T S^{-1})``), so the layer maps raw inputs.
Truncation thus discards directions weighted by how strongly they are excited.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from slimbench.methods.lowrank.calibrated import CalibratedLowRankConfig, check, factorize_calibrated

from slimbench.method import Method, MethodReport


class ASVDConfig(CalibratedLowRankConfig):
    alpha: float = Field(0.5, gt=0.0, le=2.0, description="exponent of the mean |activation| scaling")


class ChannelScale:
    """Whitening by a diagonal: mean absolute activation per input channel, to the power alpha."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def new_state(self, n: int) -> dict[str, Any]:
        return {"abs_sum": torch.zeros(n, dtype=torch.float64), "tokens": 0}

    def accumulate(self, state: dict[str, Any], x: torch.Tensor) -> None:
        state["abs_sum"] += x.double().abs().sum(0).cpu()
        state["tokens"] += x.shape[0]

    def transform(self, state: dict[str, Any]):
        scale = (state["abs_sum"] / max(state["tokens"], 1)) ** self.alpha
        # A channel never excited would get scale 0 (not invertible): floor it at a tiny
        # fraction of the largest scale, so its weights are simply kept with low priority.
        scale = scale.clamp_min(scale.max().clamp_min(1e-12) * 1e-6)
        return torch.diag(scale), (lambda right: right / scale), {}


def apply(lm, cfg: ASVDConfig, ctx) -> MethodReport:
    return factorize_calibrated(lm, cfg, ctx, ChannelScale(cfg.alpha), {"alpha": cfg.alpha})


METHOD = Method(
    name="asvd",
    family="lowrank",
    description="activation-aware SVD: input channels scaled by mean |activation|^alpha before truncation (native)",
    config=ASVDConfig,
    apply=apply,
    check=check,
    calibration_need="activation-statistics",
)
