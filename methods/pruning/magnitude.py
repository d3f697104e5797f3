"""`magnitude`: prune the weights of smallest absolute value (no data needed).

Ranking ``scope``: ``layer`` (default: the ``round(sparsity * numel)`` smallest of each linear
layer), ``row`` (per output row, like Wanda's comparison group), or ``global`` (one ranking over
every pruned layer; the total is exact, layers differ). ``pattern: "2:4"`` / ``"4:8"`` keeps the
N largest of every M consecutive input weights. lm_head and embeddings stay dense by default.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from slimbench.methods.pruning.common import pruning_report
from slimbench.methods.pruning.masks import SparsityConfig, build_mask, check_nm_shapes, global_masks, layer_stats

from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class MagnitudeConfig(SparsityConfig):
    scope: Literal["layer", "row", "global"] = Field("layer", description="where weights are ranked")

    @model_validator(mode="after")
    def _global_is_unstructured(self):
        if self.scope == "global" and self.nm is not None:
            raise ValueError(
                "scope 'global' ranks weights across layers; N:M patterns are per group: use scope 'layer'"
            )
        return self


def prune_smallest(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Copy of ``w`` with exactly ``round(sparsity * numel)`` smallest-|w| entries zeroed."""
    return w * build_mask(w.abs(), sparsity, None, "layer")


def magnitude_masks(lm, cfg: MagnitudeConfig) -> dict[str, torch.Tensor]:
    layers = dict(iter_linears(lm.model, include_lm_head=cfg.include_lm_head))
    scores = {n: get_weight(m).abs() for n, m in layers.items()}
    if cfg.scope == "global":
        return global_masks(scores, cfg.sparsity)
    return {n: build_mask(s, cfg.sparsity, cfg.nm, cfg.scope) for n, s in scores.items()}


@torch.no_grad()
def apply(lm, cfg: MagnitudeConfig, ctx) -> MethodReport:
    layers = dict(iter_linears(lm.model, include_lm_head=cfg.include_lm_head))
    stats = {}
    for name, keep in magnitude_masks(lm, cfg).items():
        set_weight(layers[name], get_weight(layers[name]) * keep)
        stats[name] = layer_stats(keep)
    return pruning_report(lm, cfg, stats, {"scope": cfg.scope})


def check(lm, cfg: MagnitudeConfig) -> None:
    check_nm_shapes(lm.model, cfg)


METHOD = Method(
    name="magnitude",
    family="pruning",
    description="magnitude pruning: per layer, row or global ranking, unstructured or N:M (simulated on CPU)",
    config=MagnitudeConfig,
    apply=apply,
    check=check,
)
