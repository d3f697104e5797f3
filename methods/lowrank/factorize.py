"""Shared low-rank machinery: the factorized layer, rank choice, allocation, save and reload.

A linear layer ``W`` ([out=m, in=n]) becomes ``B @ A`` with ``A`` [k, n] and ``B`` [m, k]: two
``nn.Linear`` (in -> k without bias, k -> out with the original bias). It holds ``k (m + n)``
weights (+ m bias) instead of ``m n``, and runs two smaller matmuls, so the saving is real
(native execution). Every method here computes ``W ~= U_k diag(s_k) R_k`` where ``R_k`` may
carry an un-whitening/un-scaling transform; the singular values are split evenly between the
two factors (``sqrt(s)`` each) so neither factor's scale is extreme (matters for later
quantization of the factors).

Rank vocabulary used by every method in this package:

- ``ratio``: the fraction of a layer's weight parameters REMOVED. ``k = floor((1 - ratio) m n / (m + n))``.
  Low-rank only saves parameters below ``m n / (m + n)``: at 20% removed, a square layer keeps
  rank 0.4 n, which is why truncating a full-rank weight costs a lot.
- ``rank``: the same explicit rank in every selected layer (must be <= min(m, n)).
- ``allocation``: ``uniform`` applies ``ratio`` to each layer; ``sensitivity`` spends the same
  global parameter budget (sum over layers of ``(1 - ratio) m n``) where it buys the most:
  greedily, one rank unit at a time, to the layer whose next singular value holds the largest
  share of that layer's (whitened/scaled) spectral energy per parameter it costs
  (``s_{l,k}^2 / sum_j s_{l,j}^2 / (m_l + n_l)``). Since each layer's gains decrease with k,
  the greedy choice is optimal for that separable objective. Relative (per-layer-normalised)
  energy is used because absolute energies differ by orders of magnitude between layers whose
  inputs have different scales; every layer keeps rank >= 1 and at most the break-even rank
  ``floor(m n / (m + n))``, beyond which factorizing would add parameters.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_model, save_model
from torch import nn

from slimbench.config import Config
from slimbench.modeling import Rebuildable, get_weight, iter_linears

Allocation = Literal["uniform", "sensitivity"]
RANKS_FILE = "lowrank_ranks.json"
WEIGHTS_FILE = "model.safetensors"


class LowRankConfig(Config):
    """Rank choice shared by svd, asvd and svd-llm."""

    ratio: float | None = Field(
        0.2, gt=0.0, lt=1.0, description="fraction of each selected layer's weight parameters removed (0 < ratio < 1)"
    )
    rank: int | None = Field(None, ge=1, description="explicit rank for every selected layer (instead of ratio)")
    allocation: Allocation = Field(
        "uniform", description="uniform: ratio per layer; sensitivity: same global budget, ranks by spectral energy"
    )
    targets: list[str] = Field(
        [], description="fnmatch patterns of linear names to factorize; empty = every decoder linear (not lm_head)"
    )

    @model_validator(mode="before")
    @classmethod
    def _rank_replaces_ratio(cls, data: Any) -> Any:
        # An explicit rank replaces the default ratio, so the stored config (which holds every
        # field) validates again as itself: {rank: 4} is stored as {ratio: null, rank: 4}.
        if isinstance(data, dict) and data.get("rank") is not None and "ratio" not in data:
            return {**data, "ratio": None}
        return data

    @model_validator(mode="after")
    def _one_rank_rule(self):
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give either ratio or rank, not both")
        if self.rank is None and self.ratio is None:
            raise ValueError("give a ratio (fraction of parameters removed) or a rank")
        if self.rank is not None and self.allocation == "sensitivity":
            raise ValueError("allocation 'sensitivity' spreads a ratio budget; it cannot be used with an explicit rank")
        return self

    def uses_rank(self) -> bool:
        return self.rank is not None


class FactorizedLinear(nn.Module, Rebuildable):
    """``y = up(down(x))``: down is in->k (no bias), up is k->out (carries the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def artifact_spec(self) -> dict[str, Any]:
        return {"in": self.in_features, "out": self.out_features, "rank": self.rank, "bias": self.up.bias is not None}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> FactorizedLinear:
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"])

    def effective_weight(self) -> torch.Tensor:
        """The [out, in] product this layer computes with."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorized_params(m: int, n: int, k: int, bias: bool = False) -> int:
    return k * (m + n) + (m if bias else 0)


def break_even_rank(m: int, n: int) -> int:
    """Largest rank whose factorization holds no more weights than the dense m x n matrix."""
    return max(1, (m * n) // (m + n))


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank that removes at least ``ratio`` of the m x n weight parameters (at least 1)."""
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def layer_bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return None if b is None else b.data


def select_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """Linears to factorize: every decoder linear (lm_head left out), or those matching ``targets``."""
    found = {n: m for n, m in iter_linears(model) if not isinstance(m, FactorizedLinear)}
    found = {n: m for n, m in found.items() if not _inside_factorized(model, n)}
    if targets:
        found = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, p) for p in targets)}
    return found


def _inside_factorized(model: nn.Module, name: str) -> bool:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return bool(parent) and isinstance(model.get_submodule(parent), FactorizedLinear)


def check_ranks(layers: dict[str, nn.Module], cfg: LowRankConfig) -> None:
    """Shape checks before anything runs: a layer to factorize exists and ``rank`` fits it."""
    if not layers:
        raise ValueError(f"no linear layer matches targets {list(cfg.targets)}")
    if cfg.rank is None:
        return
    for name, mod in layers.items():
        m, n = get_weight(mod).shape
        if cfg.rank > min(m, n):
            raise ValueError(f"rank {cfg.rank} exceeds min(out, in) = {min(m, n)} of layer {name} ({m} x {n})")


def uniform_ranks(shapes: dict[str, tuple[int, int]], cfg: LowRankConfig) -> dict[str, int]:
    if cfg.rank is not None:
        return {name: cfg.rank for name in shapes}
    return {name: rank_for_ratio(m, n, cfg.ratio) for name, (m, n) in shapes.items()}


def sensitivity_ranks(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float
) -> dict[str, int]:
    """Greedy global allocation (see module docstring) under budget ``sum (1 - ratio) m n``."""
    budget = sum((1.0 - ratio) * m * n for m, n in shapes.values())
    ranks = {name: 1 for name in shapes}
    spent = sum(m + n for m, n in shapes.values())
    energy = {name: (s.double() ** 2) / max(float((s.double() ** 2).sum()), 1e-300) for name, s in spectra.items()}
    heap = [(-_gain(energy[nm], 1, shapes[nm]), nm) for nm in shapes]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        m, n = shapes[name]
        k = ranks[name]
        if spent + (m + n) > budget:
            continue  # this layer's next unit no longer fits; a cheaper one may
        if k >= min(break_even_rank(m, n), len(energy[name])):
            continue
        ranks[name] = k + 1
        spent += m + n
        heapq.heappush(heap, (-_gain(energy[name], k + 1, shapes[name]), name))
    return ranks


def _gain(energy: torch.Tensor, k: int, shape: tuple[int, int]) -> float:
    """Energy share of the (k+1)-th singular value per parameter it costs."""
    return float(energy[k]) / (shape[0] + shape[1]) if k < len(energy) else 0.0


def build_factorized(mod: nn.Module, left: torch.Tensor, right: torch.Tensor) -> FactorizedLinear:
    """A FactorizedLinear computing ``left @ right`` ([m, k] @ [k, n]) plus the module's bias."""
    w = get_weight(mod)
    m, n = w.shape
    k = left.shape[1]
    bias = layer_bias(mod)
    new = FactorizedLinear(n, m, k, bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.down.weight.copy_(right.to(w.dtype))
        new.up.weight.copy_(left.to(w.dtype))
        if bias is not None:
            new.up.bias.copy_(bias)
    return new


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k truncation ``U_k diag(s_k) Vh_k`` as (left [m,k], right [k,n]) with sqrt(s) in each."""
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def factorize_report(
    model: nn.Module, ranks: dict[str, int], shapes: dict[str, tuple[int, int]], extra: dict
) -> dict[str, Any]:
    """Achieved ranks and parameter reduction over the factorized layers (measured on the model)."""
    dense = sum(m * n for m, n in shapes.values())
    kept = 0
    for name in ranks:
        mod = model.get_submodule(name)
        kept += mod.down.weight.numel() + mod.up.weight.numel()
    rank_values = list(ranks.values())
    return {
        "layers": len(ranks),
        "rank_min": min(rank_values),
        "rank_max": max(rank_values),
        "rank_mean": sum(rank_values) / len(rank_values),
        "factorized_weight_params": kept,
        "dense_weight_params": dense,
        "weight_params_removed": 1.0 - kept / dense,
        "ranks": ranks,
        **extra,
    }


# -- save and reload -----------------------------------------------------------------------
def factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        n: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "bias": m.up.bias is not None}
        for n, m in model.named_modules()
        if isinstance(m, FactorizedLinear)
    }


def save_factorized(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a factorized model: config.json, the weights (safetensors) and the layers' ranks.

    ``from_pretrained`` cannot rebuild FactorizedLinear layers by itself, so the structure is
    recorded in ``lowrank_ranks.json`` and ``load_factorized`` rebuilds it before loading.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    (folder / RANKS_FILE).write_text(json.dumps(factorized_layers(model), indent=1, sort_keys=True))
    save_model(model, str(folder / WEIGHTS_FILE))  # handles tied (shared) tensors
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_factorized(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the architecture from config.json, re-create the factorized layers, load weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in json.loads((folder / RANKS_FILE).read_text()).items():
        replace_module(model, name, FactorizedLinear(spec["in"], spec["out"], spec["rank"], spec["bias"], dtype=dtype))
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the rebuilt model: missing {missing[:3]}, extra {unexpected[:3]}")
    return model.eval()


def truncate_transformed(
    w: torch.Tensor, t: torch.Tensor | None, undo, k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """SVD of ``w @ t`` (float64); with ``k``, the rank-k factors with ``undo`` applied to the right one.

    Returns (singular values, left [m, k], right [k, n]); the factors are None when ``k`` is None
    (a spectrum-only pass for rank allocation). ``t=None`` is plain SVD.
    """
    w64 = w.double()
    target = w64 if t is None else w64 @ t
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    if k is None:
        return s, None, None
    left, right = split_factors(u, s, vh, k)
    return s, left, (right if undo is None else undo(right))
