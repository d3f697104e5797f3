"""The narrow interface through which tasks talk to a model.

Tasks never reach into a model's modules; they call these few methods, whose semantics
are fixed here so every task computes the same quantity the same way:

- ``encode(text)`` -> token ids, no special tokens added.
- ``token_nll(ids)`` -> for a batch ``ids`` of shape ``[B, T]``, the negative log-likelihood
  (natural log, float32) of each token ``ids[:, t]`` given ``ids[:, :t]``, for ``t = 1..T-1``:
  shape ``[B, T-1]``. Example: for ids ``[[a, b, c]]`` the result is
  ``[[-log p(b|a), -log p(c|a,b)]]``.
- ``prefill(ids)`` / ``decode(token, cache)`` -> next-token logits ``[B, V]`` and the KV cache,
  the two phases of autoregressive inference (used for latency).
- ``greedy(ids, n)`` -> ``n`` greedily generated tokens.

Methods, by contrast, may change ``model`` (the ``torch.nn.Module``) in place or replace it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LanguageModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    device: torch.device = torch.device("cpu")
    # Facts about where the weights came from, copied into every record of this model.
    provenance: dict[str, Any] = field(default_factory=dict)

    # -- text ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- scoring -------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    @torch.inference_mode()
    def token_nll(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
        # float32 log-softmax whatever the model dtype: a bf16 softmax over 50k words
        # would add error the method did not cause.
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        return nll.view(ids.shape[0], -1)

    # -- generation ----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=ids.to(self.device), use_cache=True)
        return out.logits[:, -1], out.cache

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=token.to(self.device), cache=cache, use_cache=True)
        return out.logits[:, -1], out.cache

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        logits, cache = self.prefill(ids)
        tokens = []
        for _ in range(n):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits, cache = self.decode(nxt, cache)
        return torch.cat(tokens, dim=1)

    def synchronize(self) -> None:
        """Wait for queued device work, so a clock read after it measures the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
