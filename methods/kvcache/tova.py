"""`kv-tova`: Token Omission Via Attention (Oren et al., 2024, "Transformers are Multi-State RNNs").

When a layer holds more than its budget, it keeps the positions with the highest attention from
the *current* (last) query, averaged over all attention heads of the layer, so every head of a
layer keeps the same positions (the paper's head-averaged variant, its best). The new position
itself may be dropped (TOVA does not protect it; kvpress's port does, a slight difference noted
there). Applied to the prompt's last query after prefill, then at every decoding step.
"""

from __future__ import annotations

import torch
from slimbench.methods.kvcache.policy import EvictionConfig, Policy, make_method, top_sorted


class TOVAConfig(EvictionConfig):
    pass


class TOVA(Policy):
    compresses = "both"
    window = 1
    min_budget = 1

    def keep(self, layer, view, keys: torch.Tensor, budget: int) -> torch.Tensor:
        scores = view.window_probs(1).mean(dim=(1, 2, 3))  # [B, T]: last query, mean over all heads
        idx = top_sorted(scores, budget)
        return idx[:, None, :].expand(-1, keys.shape[1], -1)


METHOD = make_method(
    "kv-tova", TOVA, TOVAConfig,
    "TOVA eviction: keep the positions the last query attends to most (mean over heads); prefill and decode",
)
