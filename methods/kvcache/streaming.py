"""`kv-streaming`: StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with
Attention Sinks") as an eviction policy with a budget.

Keeps the first ``sinks`` positions (attention sinks) and the most recent ``budget - sinks``.
This is ``kv-cache implementation: sliding-window`` (methods/acceleration/kv_layers.py) expressed
in the policy machinery, so it takes a ratio budget, composes with int8/int4 codes and is judged
beside the other policies; tests check both keep the same positions and give the same logits.
Keys keep their rotary positions (no re-rotation); evicts after the prompt and every decoding step.
"""

from __future__ import annotations

import torch
from pydantic import Field
from slimbench.methods.kvcache.policy import EvictionConfig, Policy, make_method


class StreamingConfig(EvictionConfig):
    sinks: int = Field(4, ge=0, le=1024, description="first positions always kept (attention sinks)")


class Streaming(Policy):
    compresses = "both"

    def __init__(self, cfg: StreamingConfig):
        super().__init__(cfg)
        self.min_budget = cfg.sinks + 1

    def keep(self, layer, view, keys: torch.Tensor, budget: int) -> torch.Tensor:
        t, sinks = keys.shape[2], self.cfg.sinks
        idx = torch.cat([torch.arange(sinks), torch.arange(t - (budget - sinks), t)]).to(keys.device)
        return idx.expand(keys.shape[0], keys.shape[1], budget)


METHOD = make_method(
    "kv-streaming", Streaming, StreamingConfig,
    "StreamingLLM eviction: attention sinks + most recent positions; prefill and decode",
)
