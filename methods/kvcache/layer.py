"""The evicting cache layer: holds a budget of positions per head, chosen by a policy.

One :class:`EvictionLayer` per full-attention decoder layer (Gemma 3's sliding-window layers
keep transformers' own bounded layer, as kvpress does). A forward call goes:

1. ``update(k, v)``: the held past (dequantized if stored as codes) and the call's new positions,
   exact, are returned for attention; the layer hands itself to the attention wrapper (hook.py);
2. ``after_attention(view)``: the policy updates its running scores (H2O) and, when the call
   is one it compresses after (``prefill``: calls of more than one position; ``both``: every
   call) and more than ``budget`` positions are held, keeps ``budget`` of them per KV head,
   in position order. Keys keep the rotary position they were computed at (no re-rotation);
   the next position keeps counting from every position seen.
3. Kept positions are stored in the float dtype, or (``kv_bits`` 8 / 4: evict, then quantize)
   as per-token asymmetric min-max codes with an fp16 scale and minimum per head and position,
   the scheme of ``kv-cache quantized`` per-token (int4 packed two per byte). New positions are
   exact during their own call, as in that cache.

The absolute position of every held entry is tracked (``positions``) for inspection and tests;
it is bookkeeping, not counted in ``kv_bytes``. H2O's running scores are counted there as
``policy_state``.
"""

from __future__ import annotations

from typing import Any

import torch
from slimbench.methods.acceleration.kv_layers import pack4, quantize_minmax, unpack4
from slimbench.methods.kvcache.hook import hand_off
from transformers.cache_utils import DynamicLayer


class FloatStore:
    """Held keys and values in the model's float dtype."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def past(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            empty = like[:, :, :0, :]
            return empty, empty
        return self.k, self.v

    def absorb(self, keys: torch.Tensor, values: torch.Tensor, new: int, idx: torch.Tensor | None) -> None:
        """``keys``/``values``: held + new, as attention saw them; keep ``idx`` ``[B, H, k]`` (None: all)."""
        self.k, self.v = (keys, values) if idx is None else (gather(keys, idx), gather(values, idx))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class CodeStore:
    """Held keys and values as per-token int8 / int4 codes (evict, then quantize)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, scale, zero = quantize_minmax(x, self.bits, dim=-1)  # one scale per head and position
        return (pack4(codes) if self.bits == 4 else codes), scale, zero

    def _decode(self, part: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        codes, scale, zero = part
        codes = unpack4(codes) if self.bits == 4 else codes
        return (codes.float() * scale.float() + zero.float()).to(dtype)

    def past(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.parts:
            empty = like[:, :, :0, :]
            return empty, empty
        return self._decode(self.parts["k"], like.dtype), self._decode(self.parts["v"], like.dtype)

    def absorb(self, keys: torch.Tensor, values: torch.Tensor, new: int, idx: torch.Tensor | None) -> None:
        for name, x in (("k", keys), ("v", values)):
            fresh = self._encode(x[:, :, x.shape[2] - new :, :])  # held positions are codes already
            old = self.parts.get(name)
            joined = fresh if old is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(old, fresh, strict=True))
            self.parts[name] = joined if idx is None else tuple(gather(p, idx) for p in joined)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.parts.values() for t in part)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, j], ...]`` along the position dimension (2)."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    return x.gather(2, index)


class EvictionLayer(DynamicLayer):
    """A decoder layer's KV cache under an eviction policy (see the module docstring)."""

    def __init__(self, policy: Any, rank: int, ranks: int, kv_bits: int | None):
        super().__init__()
        self.policy, self.rank, self.ranks = policy, rank, ranks
        self.store = CodeStore(kv_bits) if kv_bits else FloatStore()
        self.budget: int | None = None  # positions kept per KV head, fixed at the first compression
        self.seen = 0
        self.held = 0
        self.positions: torch.Tensor | None = None  # [B, H, held] absolute positions
        self.score: torch.Tensor | None = None  # [B, H, held] running policy score (H2O)
        self.float_dtype = torch.float32
        self.shape = (0, 0, 0)  # batch, KV heads, head dim
        self.compressions = 0
        self._call: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.float_dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.shape = (b, h, d)
        self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._call is not None:
            raise RuntimeError("the KV eviction attention hook did not run for the previous call: the model's "
                               "attention implementation was changed after the eviction policy was applied")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.store.past(key_states)
        keys = torch.cat([past_k, key_states], dim=-2)
        values = torch.cat([past_v, value_states], dim=-2)
        new = key_states.shape[-2]
        self._call = (keys, values, new)
        hand_off(self, keys)
        return keys, values

    def after_attention(self, view) -> None:
        """Score, evict and store the call's positions (step 2 of the module docstring)."""
        keys, values, new = self._call
        self._call = None
        b, h, _ = self.shape
        fresh = torch.arange(self.seen, self.seen + new, device=keys.device).expand(b, h, new)
        self.positions = torch.cat([self.positions, fresh], dim=2)
        self.seen += new
        self.policy.observe(self, view)
        total = keys.shape[2]
        idx = None
        if self.policy.compresses == "both" or new > 1:
            if self.budget is None:
                self.budget = self.policy.layer_budget(self, total)
            if total > self.budget:
                idx = self.policy.keep(self, view, keys, self.budget)
                self.compressions += 1
        self.store.absorb(keys, values, new, idx)
        if idx is not None:
            self.positions = self.positions.gather(2, idx)
            if self.score is not None:
                self.score = self.score.gather(2, idx)
        self.held = self.positions.shape[2]

    def replay(self, keys: torch.Tensor, values: torch.Tensor, view) -> None:
        """Take a recorded first call (``keys``/``values`` of all its positions) as if it ran here."""
        if self.is_initialized:
            raise RuntimeError("a recorded prefill replays into an empty layer only")
        self.lazy_initialization(keys, values)
        self._call = (keys, values, keys.shape[2])
        self.after_attention(view)

    # -- what transformers asks of a cache layer --------------------------------------------------
    def get_seq_length(self) -> int:
        """Positions seen (the next token's position), not positions held."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Held positions laid out as the `held` positions right before the query (hook.py builds
        # the exact per-layer mask; this keeps transformers' own mask consistent with it).
        return self.held + query_length, self.seen - self.held

    def kv_bytes(self) -> dict[str, Any]:
        b, h, d = self.shape
        elem = torch.empty(0, dtype=self.float_dtype).element_size()
        state = self.score.numel() * self.score.element_size() if self.score is not None else 0
        return {"logical": 2 * b * h * self.seen * d * elem, "physical": self.store.nbytes(), "positions": self.seen,
                "held": self.held, "policy_state": state}

    def reset(self) -> None:
        raise NotImplementedError("an evicting KV layer is built fresh for every sequence")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting KV cache cannot be cropped (evicted positions are gone)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("an evicting KV cache cannot be fanned out")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("an evicting KV cache cannot select batch rows")
