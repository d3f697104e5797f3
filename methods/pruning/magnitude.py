"""`magnitude`: unstructured magnitude pruning, per layer.

In every linear layer (lm_head and embeddings dense by default) the ``round(sparsity * n)``
weights of smallest absolute value are set to zero. The mask lives in a dense matrix, so
execution is ``simulated``: no time or memory is saved, and the model is stored dense.
"""

from __future__ import annotations

import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class MagnitudeConfig(Config):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights zeroed in each layer")
    include_lm_head: bool = Field(False, description="prune the output layer too")


def prune_smallest(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Copy of ``w`` with exactly ``round(sparsity * numel)`` smallest-|w| entries zeroed."""
    k = round(sparsity * w.numel())
    out = w.clone(memory_format=torch.contiguous_format)
    if k:
        idx = torch.topk(w.abs().flatten(), k, largest=False).indices
        out.view(-1)[idx] = 0
    return out


def apply(lm, cfg: MagnitudeConfig, ctx) -> MethodReport:
    layers = 0
    for _, mod in iter_linears(lm.model, include_lm_head=cfg.include_lm_head):
        set_weight(mod, prune_smallest(get_weight(mod), cfg.sparsity))
        layers += 1
    return MethodReport(
        execution="simulated",
        details={"target_sparsity": cfg.sparsity, "pattern": "unstructured", "layers": layers},
        notes=["mask in a dense model; stored dense"],
    )


METHOD = Method(
    name="magnitude",
    family="pruning",
    description="unstructured magnitude pruning per layer (simulated: masks in a dense model)",
    config=MagnitudeConfig,
    apply=apply,
)
