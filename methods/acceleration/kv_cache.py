"""`kv-cache`: which KV cache generation runs with (``lm.cache_factory``).

- ``dynamic``: transformers' ``DynamicCache`` (the default, made explicit): grows by one
  concatenation per step, holds exactly the positions seen.
- ``static``: ``StaticCache`` pre-allocated for prompt + new tokens; fixed shapes, so a compiled
  decode step is compiled once (pair it with ``compile``). It holds (and attention reads) the whole
  capacity at every step.
- ``offloaded``: ``DynamicCache(offloading=True)``: each layer's KV lives in CPU memory and is
  prefetched to the GPU for its layer. CUDA only: on a CPU device there is nothing to offload to.
- ``quantized``: int8 or int4 codes per token or per channel (methods/acceleration/kv_layers.py,
  our own implementation: transformers' quantized caches need the quanto or hqq packages).
  Lossy: the memory is really smaller, the compute dequantizes (slower per step).
- ``sliding-window``: the first ``sinks`` and the last ``window`` positions (StreamingLLM). Lossy
  once the context exceeds ``sinks + window``.

The lossless kinds give the logits of no cache at all (tested). Lossy kinds mark the factory
``lossy`` so quality tasks score *through* the cache: ``perplexity-cached`` (its own ``chunk``) and
``fidelity`` (KL in chunks of ``score_chunk`` positions), because a plain forward pass would not
use the cache at all. The KV bytes held at the measured context, logical vs physical, are the
efficiency task's ``kv_cache_bytes_logical`` / ``kv_cache_bytes_physical``; the method report gives
the per-position figures and the bytes at 2048 positions of context for one sequence.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from slimbench.methods.acceleration.kv_layers import QuantizedKVLayer, SinkWindowLayer
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from slimbench.config import Config
from slimbench.measure.roofline import attention_shape
from slimbench.method import Method, MethodReport

KINDS = ("dynamic", "static", "offloaded", "quantized", "sliding-window")
LOSSY = {"quantized", "sliding-window"}


class KVCacheConfig(Config):
    implementation: Literal["dynamic", "static", "offloaded", "quantized", "sliding-window"] = Field(
        "dynamic", description="which KV cache generation uses"
    )
    @classmethod
    def label_keys(cls, params: dict) -> tuple[str, ...]:
        """The bits say something only about a quantized cache ("kv-cache(8-bit, static)" misleads)."""
        return ("implementation", "bits") if params.get("implementation") == "quantized" else ("implementation",)

    bits: Literal[8, 4] = Field(8, description="quantized: bits per code")
    key_axis: Literal["token", "channel"] = Field("token", description="quantized: keys per-token or per-channel")
    value_axis: Literal["token", "channel"] = Field("token", description="quantized: values per-token or per-channel")
    channel_group: int | None = Field(
        None, ge=2, description="quantized, per-token: channels per scale (null: the head)"
    )
    token_block: int = Field(32, ge=1, le=4096, description="quantized, per-channel: positions per scale")
    residual: int = Field(0, ge=0, le=65536, description="quantized: most recent positions kept in full precision")
    sinks: int = Field(4, ge=0, le=65536, description="sliding-window: first positions always kept")
    window: int = Field(1024, ge=1, le=1048576, description="sliding-window: most recent positions kept")
    score_chunk: int = Field(16, ge=1, le=8192, description="lossy kinds: positions per forward when fidelity "
                             "scores through the cache")

    @model_validator(mode="after")
    def _int4_groups(self):
        if self.implementation == "quantized" and self.bits == 4 and self.channel_group and self.channel_group % 2:
            raise ValueError(f"channel_group {self.channel_group}: int4 codes pack in pairs, use an even group")
        return self


class CacheFactory:
    """``lm.cache_factory``: builds the configured cache for (batch, capacity)."""

    def __init__(self, cfg: KVCacheConfig):
        self.cfg = cfg
        self.lossy = cfg.implementation in LOSSY
        self.score_chunk = cfg.score_chunk

    def __call__(self, lm, batch_size: int, capacity: int) -> Cache:
        cfg, config = self.cfg, lm.model.config
        if cfg.implementation == "dynamic":
            return DynamicCache(config=config)
        if cfg.implementation == "static":
            return StaticCache(config=config, max_cache_len=capacity)
        if cfg.implementation == "offloaded":
            return DynamicCache(config=config, offloading=True)
        layers = attention_shape(lm.model)[0]
        if cfg.implementation == "quantized":
            return Cache(layers=[QuantizedKVLayer(cfg.bits, cfg.key_axis, cfg.value_axis, cfg.channel_group,
                                                  cfg.token_block, cfg.residual) for _ in range(layers)])
        return Cache(layers=[SinkWindowLayer(cfg.sinks, cfg.window) for _ in range(layers)])

    def __repr__(self) -> str:
        return f"CacheFactory({self.cfg.implementation})"


def bytes_per_position(cfg: KVCacheConfig, layers: int, kv_heads: int, head_dim: int, elem: int) -> dict[str, float]:
    """Logical and physical KV bytes per position of one sequence (analytical, steady state)."""
    logical = 2 * layers * kv_heads * head_dim * elem
    if cfg.implementation != "quantized":
        return {"logical": logical, "physical": logical}
    per_stream = 0.0
    for axis in (cfg.key_axis, cfg.value_axis):
        codes = head_dim * cfg.bits / 8
        scales = 2 * 2 * (head_dim / (cfg.channel_group or head_dim) if axis == "token" else head_dim / cfg.token_block)
        per_stream += codes + scales
    return {"logical": logical, "physical": layers * kv_heads * per_stream}


def check(lm, cfg: KVCacheConfig) -> None:
    kind = cfg.implementation
    if kind == "offloaded" and lm.device.type != "cuda":
        raise ValueError("kv-cache offloaded moves the KV cache from the GPU to CPU memory; on a CPU device there is "
                         "nothing to offload to: use dynamic, static, quantized or sliding-window")
    if kind in LOSSY:
        types = set(getattr(lm.model.config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"kv-cache {kind} supports models whose layers all use full attention; "
                             f"{lm.name} has layer types {sorted(types)}")
    if kind == "quantized":
        _, _, _, head_dim = attention_shape(lm.model)
        g = cfg.channel_group
        if g and head_dim % g:
            raise ValueError(f"kv-cache channel_group {g} does not divide the head dimension {head_dim} of {lm.name}")
        if cfg.bits == 4 and head_dim % 2:
            raise ValueError(f"kv-cache int4 packs codes in pairs; the head dimension {head_dim} of {lm.name} is odd")


def apply(lm, cfg: KVCacheConfig, ctx) -> MethodReport:
    lm.cache_factory = CacheFactory(cfg)
    layers, _, kv_heads, head_dim = attention_shape(lm.model)
    elem = next(p for p in lm.model.parameters() if p.is_floating_point()).element_size()
    per = bytes_per_position(cfg, layers, kv_heads, head_dim, elem)
    at = 2048
    held = min(at, cfg.sinks + cfg.window) if cfg.implementation == "sliding-window" else at
    details: dict[str, Any] = {
        "implementation": cfg.implementation,
        "lossy": cfg.implementation in LOSSY,
        "kv_bytes_per_position_logical": per["logical"],
        "kv_bytes_per_position_physical": per["physical"],
        "kv_bytes_at_2048_logical": per["logical"] * at,
        "kv_bytes_at_2048_physical": per["physical"] * held,
    }
    notes = []
    if cfg.implementation == "quantized":
        details.update(bits=cfg.bits, key_axis=cfg.key_axis, value_axis=cfg.value_axis, residual=cfg.residual)
        notes.append("our own quantized KV cache: codes + fp16 scales/minima are really held; attention "
                     "dequantizes the past at every step (more compute per step, not less)")
    if cfg.implementation == "sliding-window":
        details.update(sinks=cfg.sinks, window=cfg.window)
    if cfg.implementation in LOSSY:
        notes.append(f"lossy: quality tasks score through the cache (fidelity in chunks of {cfg.score_chunk})")
    if cfg.implementation == "static":
        notes.append("pre-allocated for prompt + new tokens: attention reads the whole capacity at every step")
    return MethodReport(execution="native", details=details, notes=notes)


METHOD = Method(
    name="kv-cache",
    family="acceleration",
    description="KV cache implementation: dynamic, static (compile-friendly), offloaded (CUDA), quantized int8/int4 "
    "(per-token or per-channel), sliding window with attention sinks",
    config=KVCacheConfig,
    apply=apply,
    check=check,
)

