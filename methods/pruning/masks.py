"""Masks shared by every scoring pruner (magnitude, wanda, sparsegpt), and the pattern config.

A pruner computes a score per weight (``|W|`` for magnitude, ``|W|·‖X‖₂`` for Wanda); this
module turns a score matrix ``[out, in]`` into a boolean *keep* mask, in one of three ways:

- ``row``: in every output row, the ``round(sparsity * in)`` lowest scores are pruned (Wanda's
  comparison group);
- ``layer``: the ``round(sparsity * numel)`` lowest scores of the whole matrix are pruned;
- N:M (``"2:4"``, ``"4:8"``): in every group of M consecutive input channels of a row, the N
  highest scores are kept (NVIDIA's convention: N non-zeros out of M).

``topk`` rather than a threshold, so ties never change how many weights are pruned: the
achieved sparsity of every layer is exactly the count asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from slimbench.config import Config
from slimbench.modeling import get_weight, iter_linears


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M), validated (1 <= N <= M)."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' (got {pattern!r})")
    n, m = (int(p) for p in parts)
    if m < 1 or n < 1:
        raise ValueError(f"pattern {pattern}: N and M must be at least 1 (N:M keeps N of every M weights)")
    if n > m:
        raise ValueError(f"pattern {pattern}: N ({n}) must not exceed M ({m}); N:M keeps N of every M weights")
    return n, m


class SparsityConfig(Config):
    """Target sparsity and pattern: fields every scoring pruner shares.

    With an N:M pattern the sparsity is fixed at ``1 - N/M``: leave ``sparsity`` out (it is
    filled in) or give exactly that value.
    """

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights zeroed in each layer")
    pattern: str = Field("unstructured", description="'unstructured' or N:M semi-structured, e.g. '2:4', '4:8'")
    include_lm_head: bool = Field(False, description="prune the output layer too")

    @model_validator(mode="before")
    @classmethod
    def _nm_fixes_sparsity(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "pattern" not in data:
            return data
        nm = parse_pattern(str(data["pattern"]))
        if nm is None:
            return data
        implied = 1 - nm[0] / nm[1]
        given = data.get("sparsity")
        if given is not None and abs(float(given) - implied) > 1e-9:
            raise ValueError(
                f"pattern {data['pattern']} fixes sparsity at {implied:g}; drop `sparsity` or set it to {implied:g}"
            )
        return {**data, "sparsity": implied}

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def check_nm_shapes(model: torch.nn.Module, cfg: SparsityConfig) -> None:
    """N:M groups run along the input dimension, which must be a multiple of M."""
    nm = cfg.nm
    if nm is None:
        return
    for name, mod in iter_linears(model, include_lm_head=cfg.include_lm_head):
        cols = get_weight(mod).shape[1]
        if cols % nm[1]:
            raise ValueError(
                f"pattern {cfg.pattern}: layer {name} has {cols} input channels, not a multiple of {nm[1]}"
            )


def check_layerwise_pruning(lm, cfg: SparsityConfig) -> None:
    """Checks of the calibrated pruners: a layer-wise adapter exists and N:M fits every layer."""
    from slimbench.layerwise import adapter_for

    adapter_for(lm.model)  # a clear error for architectures without a layer-wise adapter
    check_nm_shapes(lm.model, cfg)

def mask_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``score`` (any shape) with exactly its ``k`` lowest entries pruned."""
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[torch.topk(score.flatten().float(), k, largest=False).indices] = False
    return keep.view_as(score)


def mask_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * in)`` lowest scores of every output row."""
    k = round(sparsity * score.shape[1])
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.topk(score.float(), k, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep


def mask_per_layer(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    return mask_lowest(score, round(sparsity * score.numel()))


def mask_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input channels."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input dimension ({cols}) to be a multiple of M")
    groups = score.float().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.view(rows, cols)


def build_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str = "row") -> torch.Tensor:
    """The keep-mask for one layer: N:M when ``nm`` is given, else per ``row`` or per ``layer``."""
    if nm is not None:
        return mask_nm(score, *nm)
    if scope == "row":
        return mask_per_row(score, sparsity)
    if scope == "layer":
        return mask_per_layer(score, sparsity)
    raise ValueError(f"unknown mask scope {scope!r} (row, layer)")


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking across all layers: the ``round(sparsity * total)`` lowest scores pruned.

    Layers then end with different sparsities (what global ranking is for); the total is exact.
    """
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    keep = mask_lowest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


def nm_violations(w: torch.Tensor, n: int, m: int) -> int:
    """Groups of ``m`` consecutive input channels holding more than ``n`` non-zeros."""
    rows, cols = w.shape
    nonzero = (w.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return int((nonzero > n).sum())


def layer_stats(keep: torch.Tensor) -> dict[str, float | int]:
    pruned = int((~keep).sum())
    return {"pruned": pruned, "numel": keep.numel(), "sparsity": pruned / keep.numel()}


def summarize_layers(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Achieved sparsity over the pruned layers: overall, min and max (from the masks applied)."""
    per = [s["sparsity"] for s in stats.values()]
    total = sum(s["numel"] for s in stats.values())
    return {
        "layers": len(stats),
        "achieved_sparsity": sum(s["pruned"] for s in stats.values()) / total if total else 0.0,
        "achieved_sparsity_layer_min": min(per, default=0.0),
        "achieved_sparsity_layer_max": max(per, default=0.0),
    }
