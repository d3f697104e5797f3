"""`kv-pyramidkv`: PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling").

SnapKV's selection (observation window, pooled attention, top-k per KV head) with a budget that
shrinks linearly with depth: with ``B`` the uniform budget and ``w`` the window, the lowest
evicting layer keeps ``w + max`` and the highest ``w + min``, ``min = (B - w) / beta``,
``max = 2 (B - w) - min`` (capped at the prompt, the excess moved to ``min``), in equal steps, so
the layers' mean is ``B``: the authors' schedule (``beta = 20``), stepped over ``L - 1`` gaps as
kvpress's ``PyramidKVPress`` does so the total equals the uniform budget's. Only full-attention
layers count as layers of the pyramid.
"""

from __future__ import annotations

from pydantic import Field
from slimbench.methods.kvcache.policy import make_method
from slimbench.methods.kvcache.snapkv import SnapKV, SnapKVConfig


class PyramidKVConfig(SnapKVConfig):
    beta: float = Field(20, ge=1, le=1000, description="pyramid steepness: the top layer keeps 1/beta of the "
                        "uniform budget beyond the window")


class PyramidKV(SnapKV):
    def layer_budget(self, layer, total: int) -> int:
        base = self.base_budget(total)
        w, rest = self.cfg.window, base - self.cfg.window
        if layer.ranks < 2 or rest <= 0:
            return base
        low = rest / self.cfg.beta
        high = 2 * rest - low
        if high >= total - w:
            high = total - w
            low = 2 * rest - high
        if low < 0:  # the pyramid does not fit this prompt: the uniform budget
            return base
        step = (high - low) / (layer.ranks - 1)
        return max(self.min_budget, w + round(high - layer.rank * step))


METHOD = make_method(
    "kv-pyramidkv", PyramidKV, PyramidKVConfig,
    "PyramidKV eviction: SnapKV selection, budgets shrinking linearly from lower to higher layers; after the prompt",
)
METHOD.test_params.update(window=4)
