"""`kv-knorm`: key-norm pruning (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based
Strategy for KV Cache Compression").

Keeps, per KV head, the positions whose key has the *lowest* L2 norm (the paper's finding: a low
key norm predicts high attention). No attention scores needed. Applied after prompt calls, as
kvpress's ``KnormPress`` (score ``-keys.norm(dim=-1)``); decoding grows the cache.
"""

from __future__ import annotations

import torch
from slimbench.methods.kvcache.policy import EvictionConfig, Policy, make_method, top_sorted


class KNormConfig(EvictionConfig):
    pass


class KNorm(Policy):
    compresses = "prefill"
    min_budget = 1

    def keep(self, layer, view, keys: torch.Tensor, budget: int) -> torch.Tensor:
        return top_sorted(-keys.float().norm(dim=-1), budget)


METHOD = make_method(
    "kv-knorm", KNorm, KNormConfig,
    "key-norm pruning: keep the positions with the lowest key L2 norm, per KV head; after the prompt",
)
