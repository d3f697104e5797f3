"""How an evicting cache layer sees the queries: a wrapper around transformers' SDPA attention.

transformers' attention modules call ``cache.update(k, v, layer_idx)`` and then the attention
function registered under ``config._attn_implementation``. Eviction policies that score positions
by attention (H2O, SnapKV, PyramidKV, TOVA) need the queries of that call, post-RoPE, which the
cache never sees. So :func:`install` registers one attention function, ``slimbench_kv``, that:

1. finds the evicting layer whose ``update`` returned this very ``key`` tensor (a thread-local
   hand-off; any other layer, e.g. Gemma 3's sliding-window layers, passes straight through);
2. builds that layer's own causal mask (layers may hold different numbers of positions, as in
   PyramidKV, while transformers builds one mask from the first layer's sizes);
3. runs the same SDPA function transformers would have run, so the outputs are unchanged;
4. hands the layer a :class:`CallView` (queries, keys, scaling) to score and evict with.

Attention probabilities are recomputed from the queries only where a policy asks for them,
in blocks of query rows (never a full ``T x T`` matrix), in float32. ``CallView`` and the
recorded :class:`RecordView` share one implementation so a recorded prefill replays to the
same bits (tests/test_kv_eviction.py).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

NAME = "slimbench_kv"
BLOCK_ROWS = 128  # query rows per block when summing attention columns (memory ~ rows x T x heads)
_local = threading.local()


def hand_off(layer: Any, keys: torch.Tensor) -> None:
    """Called by an evicting layer's ``update``: the next attention call with ``keys`` is its."""
    _local.pending = (layer, keys)


def _take(keys: torch.Tensor) -> Any:
    pending = getattr(_local, "pending", None)
    if pending is not None and pending[1] is keys:
        _local.pending = None
        return pending[0]
    return None


def attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention, plus the evicting layer's view of the call (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _take(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q, t = query.shape[2], key.shape[2]
    held = t - q
    if q > 1 and held > 0:  # every held position precedes every new one; new ones are causal
        rows = torch.arange(q, device=key.device)[:, None]
        cols = torch.arange(t, device=key.device)[None, :]
        attention_mask = ((cols < held) | (cols - held <= rows))[None, None]
    elif q == 1 or held == 0:
        attention_mask = None  # decode sees every held position; a first call is plain causal
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    layer.after_attention(CallView(query, key, float(scaling if scaling is not None else module.scaling)))
    return out


def install(model: torch.nn.Module) -> None:
    """Route the model's attention through :func:`attention` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    current = model.config._attn_implementation
    if current == NAME:
        return
    if current != "sdpa":
        raise ValueError(f"KV eviction policies wrap SDPA attention; this model runs {current!r} attention")
    model.set_attn_implementation(NAME)


def installable(model: torch.nn.Module) -> str | None:
    """Why the hook cannot be installed on ``model`` (None: it can)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", NAME, None):
        return f"KV eviction policies wrap SDPA attention; this model runs {impl!r} attention"
    return None


# -- attention probabilities, recomputed for scoring ---------------------------------------------
def probabilities(query_rows: torch.Tensor, keys: torch.Tensor, scaling: float, first_row: int) -> torch.Tensor:
    """Softmax attention of query rows over ``keys``: ``[B, Hkv, g, r, T]`` float32.

    ``query_rows`` ``[B, Hq, r, D]`` are the queries at positions ``first_row .. first_row+r-1``
    of the ``T`` keys (causal: row ``i`` sees keys ``0 .. first_row+i``); the ``Hq`` query heads
    are grouped onto the ``Hkv`` key heads as GQA does (head ``h`` reads key head ``h // g``).
    """
    b, hq, r, d = query_rows.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    q = query_rows.float().reshape(b, hkv, g, r, d)
    logits = torch.matmul(q, keys.float()[:, :, None].transpose(-1, -2)) * scaling
    visible = torch.arange(t, device=keys.device)[None, :] <= (first_row + torch.arange(r, device=keys.device))[:, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


class CallView:
    """What one forward call through an evicting layer attended with (live, during the call)."""

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, scaling: float):
        self.query, self.keys, self.scaling = query, keys, scaling
        self.q = query.shape[2]
        self.t = keys.shape[2]
        self._colsum: torch.Tensor | None = None

    def window_queries(self, w: int) -> torch.Tensor:
        """The last ``w`` queries of the call, contiguous (so a recorded copy computes the same bits)."""
        return self.query[:, :, self.q - w :, :].contiguous()

    def window_probs(self, w: int) -> torch.Tensor:
        """Attention of the call's last ``w`` queries over all ``T`` keys: ``[B, Hkv, g, w, T]``."""
        w = min(w, self.q)
        return probabilities(self.window_queries(w), self.keys, self.scaling, self.t - w)

    def colsum(self) -> torch.Tensor:
        """Attention each key received, summed over all queries of the call and the query heads of
        its group: ``[B, Hkv, T]`` float32 (H2O's accumulated score, one call's share)."""
        if self._colsum is None:
            b, hkv, t = self.keys.shape[0], self.keys.shape[1], self.t
            total = torch.zeros(b, hkv, t, dtype=torch.float32, device=self.keys.device)
            for start in range(0, self.q, BLOCK_ROWS):
                rows = self.query[:, :, start : start + BLOCK_ROWS, :]
                total += probabilities(rows, self.keys, self.scaling, self.t - self.q + start).sum(dim=(2, 3))
            self._colsum = total
        return self._colsum


class RecordView(CallView):
    """A recorded first call (no positions held before it): its last queries and column sums.

    Answers what the live view would for any window up to the recorded one, from the same
    tensors, so a policy replayed on it keeps the same positions.
    """

    def __init__(self, window_query: torch.Tensor, keys: torch.Tensor, scaling: float, colsum: torch.Tensor, q: int):
        super().__init__(window_query, keys, scaling)
        self.q, self.t = q, keys.shape[2]
        self._colsum = colsum
        self.recorded_window = window_query.shape[2]

    def window_queries(self, w: int) -> torch.Tensor:
        if w > self.recorded_window:
            raise ValueError(f"a window of {w} queries was asked of a prefill recorded with {self.recorded_window}")
        return self.query[:, :, self.recorded_window - w :, :].contiguous()
