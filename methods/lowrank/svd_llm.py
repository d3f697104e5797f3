"""`svd-llm`: truncation-aware data whitening (Wang et al., 2024, SVD-LLM).

With calibration inputs X ([tokens, n]) and ``X^T X = L L^T`` (Cholesky, L lower-triangular),
the layer's output error is ``||X (W - W')^T||_F = ||(W - W') L||_F``. So the SVD is taken of
``W L = U diag(s) V^T``; keeping the top k gives ``W' = U_k diag(s_k) V_k^T L^{-1}`` whose
squared output error on the calibration inputs equals the sum of the discarded ``s_i^2``
exactly: truncating a singular value costs precisely its square, and the rank-k choice is
optimal for the calibration output loss. ``X^T X`` is accumulated in float64; if it is not
positive definite (dead channels, too few tokens) a damping ``lambda * mean(diag) * I`` is
added, starting at ``damping`` and multiplied by 10 until Cholesky succeeds (reported).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from slimbench.methods.lowrank.calibrated import CalibratedLowRankConfig, check, factorize_calibrated

from slimbench.method import Method, MethodReport


class SVDLLMConfig(CalibratedLowRankConfig):
    damping: float = Field(1e-6, gt=0.0, lt=1.0, description="first relative damping tried when X^T X is not PD")


class CholeskyWhitening:
    def __init__(self, damping: float):
        self.damping = damping

    def new_state(self, n: int) -> dict[str, Any]:
        return {"xtx": torch.zeros(n, n, dtype=torch.float64)}

    def accumulate(self, state: dict[str, Any], x: torch.Tensor) -> None:
        x = x.double().cpu()
        state["xtx"] += x.T @ x

    def transform(self, state: dict[str, Any]):
        chol, damping = cholesky_damped(state["xtx"], self.damping)

        def undo(right: torch.Tensor) -> torch.Tensor:  # right @ L^{-1}, by a triangular solve
            return torch.linalg.solve_triangular(chol, right, upper=False, left=False)

        return chol, undo, {"damping": damping}


def cholesky_damped(xtx: torch.Tensor, first: float, tries: int = 12) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``xtx``, damped only if needed; returns (L, relative damping used)."""
    chol, info = torch.linalg.cholesky_ex(xtx)
    if int(info) == 0:
        return chol, 0.0
    mean_diag = float(xtx.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype)
    lam = first
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(xtx + lam * mean_diag * eye)
        if int(info) == 0:
            return chol, lam
        lam *= 10
    raise ValueError(f"X^T X is not positive definite even with damping {lam / 10:g}")


def apply(lm, cfg: SVDLLMConfig, ctx) -> MethodReport:
    return factorize_calibrated(lm, cfg, ctx, CholeskyWhitening(cfg.damping), {})


METHOD = Method(
    name="svd-llm",
    family="lowrank",
    description="SVD-LLM: SVD of W L (Cholesky of X^T X from calibration), truncation = output loss (native)",
    config=SVDLLMConfig,
    apply=apply,
    check=check,
    calibration_need="hessian",  # Cholesky of X^T X
)
