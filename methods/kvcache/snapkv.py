"""`kv-snapkv`: SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for
Before Generation").

After a prompt call, each KV head keeps the last ``window`` positions (the observation window)
and the ``budget - window`` earlier positions that the window's queries attend to most: the
softmax weights of the window's queries, summed over the window, smoothed along positions by a
1-D pooling of ``kernel`` (the authors' code: ``avg_pool1d``, padding ``kernel // 2``), then
``topk``. With grouped-query attention the pooled scores of a group's query heads are averaged
(kvpress's ``SnapKVPress``, after the SnapKV issue on GQA). Defaults are the authors' code
defaults (window 32, kernel 5, average pooling). Decoding grows the cache, as in the paper.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from slimbench.methods.kvcache.policy import EvictionConfig, Policy, make_method, top_sorted


class SnapKVConfig(EvictionConfig):
    window: int = Field(32, ge=1, le=4096, description="observation window: last positions of the prompt, kept, "
                        "whose queries score the rest")
    kernel: int = Field(5, ge=1, le=63, description="pooling kernel along positions (odd)")
    pooling: Literal["avg", "max"] = Field("avg", description="pooling of the window's attention")


def window_scores(view, window: int, kernel: int, pooling: str, t: int) -> tuple[torch.Tensor, int]:
    """Pooled attention of the last ``w`` queries over the first ``t - w`` keys: ``[B, Hkv, t - w]``, and ``w``."""
    w = min(window, view.q)
    probs = view.window_probs(w)[..., : t - w].sum(dim=3)  # [B, Hkv, g, t - w]
    b, h, g, n = probs.shape
    flat = probs.reshape(b * h * g, 1, n)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    pooled = pool(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    return pooled.reshape(b, h, g, n).mean(dim=2), w


class SnapKV(Policy):
    compresses = "prefill"

    def __init__(self, cfg: SnapKVConfig):
        super().__init__(cfg)
        self.window = cfg.window
        self.min_budget = cfg.window + 1

    def keep(self, layer, view, keys: torch.Tensor, budget: int) -> torch.Tensor:
        t = keys.shape[2]
        scores, w = window_scores(view, self.cfg.window, self.cfg.kernel, self.cfg.pooling, t)
        chosen = top_sorted(scores, budget - w)
        tail = torch.arange(t - w, t, device=keys.device).expand(*chosen.shape[:2], w)
        return torch.cat([chosen, tail], dim=2)


METHOD = make_method(
    "kv-snapkv", SnapKV, SnapKVConfig,
    "SnapKV eviction: observation-window attention, pooled, top-k per KV head; after the prompt",
)
METHOD.test_params.update(window=4)
