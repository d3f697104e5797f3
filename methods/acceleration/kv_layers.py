"""KV cache layers of our own: quantized (int8 / int4) and sliding window with attention sinks.

Both plug into transformers' ``Cache`` (one layer object per decoder layer) and answer
``kv_bytes()`` so the efficiency task can count what they hold (slimbench.measure.roofline).

**Quantized** (:class:`QuantizedKVLayer`): keys and values are stored as integer codes with an
fp16 scale and minimum (asymmetric min-max) per group:

- ``token`` axis (per-token): each new position is quantized on arrival, one scale per
  ``channel_group`` channels of each head (the whole head by default);
- ``channel`` axis (per-channel, KIVI's choice for keys, whose outlier channels are stable over
  tokens): one scale per channel over blocks of ``token_block`` positions; positions waiting for
  a full block stay in full precision.

``residual`` most recent positions are kept in full precision (KIVI's window). int4 codes are
packed two per byte. At every step the stored past is dequantized and the *current* positions
are used exactly (attention runs before they are stored), as in transformers' QuantizedCache.
So a one-shot prefill sees no quantization at all: quality must be measured through the cache
in chunks (tasks/perplexity_cached.py), which is what decoding does, one token at a time.

**Sliding window with sinks** (:class:`SinkWindowLayer`, StreamingLLM): after each update only
the first ``sinks`` positions and the last ``window`` positions are kept. Keys keep the rotary
position they were computed at (no re-rotation); positions keep counting, so the model sees
gaps, not shifted positions. Within one forward call the new positions see each other and
everything kept before the call.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

SCALE_DTYPE = torch.float16


# -- integer codes ----------------------------------------------------------------------------
def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension (which must be even)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return out.flatten(-2)


def quantize_minmax(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max codes of ``x`` with one (scale, min) per slice along ``dim`` (kept, size 1)."""
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    # Scales are stored in fp16: quantize with the rounded values so decode matches encode.
    scale, lo = scale.to(SCALE_DTYPE), lo.to(SCALE_DTYPE)
    codes = ((xf - lo.float()) / scale.float()).round().clamp(0, qmax).to(torch.uint8)
    return codes, scale, lo


class QuantStore:
    """One tensor stream (keys or values) of one layer: quantized past + full-precision tail."""

    def __init__(self, bits: int, axis: str, channel_group: int | None, token_block: int, residual: int):
        self.bits, self.axis = bits, axis
        self.channel_group, self.token_block, self.residual = channel_group, token_block, residual
        self.codes: torch.Tensor | None = None  # [B, H, Tq, D or D/2]
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None  # [B, H, Tr, D] full precision
        self.head_dim = 0

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, h, t, d = x.shape
        if self.axis == "token":
            g = self.channel_group or d
            codes, scale, zero = quantize_minmax(x.reshape(b, h, t, d // g, g), self.bits, dim=-1)
            codes, scale, zero = codes.reshape(b, h, t, d), scale.squeeze(-1), zero.squeeze(-1)  # scale [B,H,T,D/g]
        else:
            blk = self.token_block
            codes, scale, zero = quantize_minmax(x.reshape(b, h, t // blk, blk, d), self.bits, dim=-2)
            codes, scale, zero = codes.reshape(b, h, t, d), scale.squeeze(-2), zero.squeeze(-2)  # scale [B,H,T/blk,D]
        return (pack4(codes) if self.bits == 4 else codes), scale, zero

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.codes is None:
            return None
        codes = unpack4(self.codes) if self.bits == 4 else self.codes
        b, h, t, d = codes.shape
        if self.axis == "token":
            g = self.channel_group or d
            x = codes.view(b, h, t, d // g, g).float() * self.scale.float()[..., None] + self.zero.float()[..., None]
        else:
            blk = self.token_block
            scale, zero = self.scale.float()[..., None, :], self.zero.float()[..., None, :]
            x = codes.view(b, h, t // blk, blk, d).float() * scale + zero
        return x.reshape(b, h, t, d).to(dtype)

    def append(self, x: torch.Tensor) -> None:
        """Add positions; quantize every position that leaves the full-precision tail."""
        self.head_dim = x.shape[-1]
        tail = x if self.tail is None else torch.cat([self.tail, x], dim=-2)
        ready = max(0, tail.shape[-2] - self.residual)
        if self.axis == "channel":
            ready -= ready % self.token_block  # only whole blocks share a per-channel scale
        if ready:
            codes, scale, zero = self._encode(tail[..., :ready, :])
            if self.codes is None:
                self.codes, self.scale, self.zero = codes, scale, zero
            else:
                self.codes = torch.cat([self.codes, codes], dim=-2)
                self.scale = torch.cat([self.scale, scale], dim=-2)
                self.zero = torch.cat([self.zero, zero], dim=-2)
        self.tail = tail[..., ready:, :]

    def past(self, dtype: torch.dtype) -> list[torch.Tensor]:
        parts = [self.dequantized(dtype), self.tail]
        return [p for p in parts if p is not None and p.shape[-2] > 0]

    def nbytes(self) -> int:
        held = (self.codes, self.scale, self.zero, self.tail)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


class QuantizedKVLayer(DynamicLayer):
    """A decoder layer's KV cache held as int8/int4 codes (see the module docstring)."""

    def __init__(self, bits: int, key_axis: str, value_axis: str, channel_group: int | None, token_block: int,
                 residual: int):
        super().__init__()
        self.k = QuantStore(bits, key_axis, channel_group, token_block, residual)
        self.v = QuantStore(bits, value_axis, channel_group, token_block, residual)
        self.seen = 0
        self.float_dtype = torch.float32
        self.batch_heads = (0, 0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.float_dtype = key_states.device, key_states.dtype
        self.batch_heads = tuple(key_states.shape[:2])
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([*self.k.past(key_states.dtype), key_states], dim=-2)
        values = torch.cat([*self.v.past(value_states.dtype), value_states], dim=-2)
        self.k.append(key_states)
        self.v.append(value_states)
        self.seen += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def kv_bytes(self) -> dict[str, Any]:
        b, h = self.batch_heads
        elem = torch.empty(0, dtype=self.float_dtype).element_size()
        logical = 2 * b * h * self.seen * self.k.head_dim * elem
        return {"logical": logical, "physical": self.k.nbytes() + self.v.nbytes(), "positions": self.seen,
                "held": self.seen}

    def reset(self) -> None:
        raise NotImplementedError("a quantized KV layer is built fresh for every sequence")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (its codes are not per position)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be fanned out")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a quantized KV cache cannot select batch rows")


class SinkWindowLayer(DynamicLayer):
    """Keeps the first ``sinks`` and the last ``window`` positions (see the module docstring)."""

    def __init__(self, sinks: int, window: int):
        super().__init__()
        self.sinks, self.window = sinks, window
        self.seen = 0
        self.kept_positions: list[int] = []  # absolute positions held, for inspection and tests

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        new = key_states.shape[-2]
        positions = self.kept_positions + list(range(self.seen, self.seen + new))
        self.seen += new
        if keys.shape[-2] > self.sinks + self.window:  # evict the middle, for the next call
            keep = torch.cat([torch.arange(self.sinks), torch.arange(keys.shape[-2] - self.window, keys.shape[-2])])
            self.keys = keys.index_select(-2, keep.to(keys.device))
            self.values = values.index_select(-2, keep.to(values.device))
            self.kept_positions = positions[: self.sinks] + positions[len(positions) - self.window :]
        else:
            self.keys, self.values, self.kept_positions = keys, values, positions
        return keys, values

    def get_seq_length(self) -> int:
        """Positions seen (the next token's position), not positions held."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Held positions are laid out as if they were the `held` positions right before the
        # query: every one of them precedes every query, and the new positions are causal.
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, self.seen - held

    def kv_bytes(self) -> dict[str, Any]:
        if not self.is_initialized or self.keys.numel() == 0:
            return {"logical": 0, "physical": 0, "positions": self.seen, "held": 0}
        held = self.keys.shape[-2]
        physical = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return {"logical": int(physical / held * self.seen), "physical": physical, "positions": self.seen,
                "held": held}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sliding-window cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a sliding-window cache cannot be fanned out")
