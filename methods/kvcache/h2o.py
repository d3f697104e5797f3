"""`kv-h2o`: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models").

Each KV head keeps the ``heavy`` fraction of its budget for the positions with the largest
*accumulated* attention (the sum, over every query so far, of the softmax weight each key
received; the prompt's queries included) and the rest for the most recent positions. The
accumulation and the greedy "evict the lowest accumulated score outside the recent window" rule
follow the authors' real-drop cache (``H2OKVCache_LayerWise``: ``hh_score`` summed over queries
per head, ``topk`` over all but the ``recent_size`` newest positions). With grouped-query
attention the query heads of a group add into their KV head's score. The paper's default split
is half heavy hitters, half recent. Evicts after the prompt and at every decoding step.
"""

from __future__ import annotations

import torch
from pydantic import Field
from slimbench.methods.kvcache.policy import EvictionConfig, Policy, make_method, top_sorted


class H2OConfig(EvictionConfig):
    heavy: float = Field(0.5, gt=0, lt=1, description="share of the budget for heavy hitters (the rest: most recent)")


class H2O(Policy):
    compresses = "both"

    def observe(self, layer, view) -> None:
        acc = view.colsum().clone()  # [B, H, T]: this call's attention, held positions then new ones
        if layer.score is not None:
            acc[:, :, : layer.score.shape[2]] += layer.score
        layer.score = acc

    def keep(self, layer, view, keys: torch.Tensor, budget: int) -> torch.Tensor:
        t = keys.shape[2]
        heavy = min(budget - 1, max(1, round(budget * self.cfg.heavy)))
        recent = budget - heavy
        hitters = top_sorted(layer.score[:, :, : t - recent], heavy)
        tail = torch.arange(t - recent, t, device=keys.device).expand(*hitters.shape[:2], recent)
        return torch.cat([hitters, tail], dim=2)


METHOD = make_method(
    "kv-h2o", H2O, H2OConfig,
    "H2O eviction: heavy hitters by accumulated attention + most recent positions, per KV head; prefill and decode",
)
