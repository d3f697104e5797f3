"""What every eviction policy shares: its config, the cache factory, recorded prefills, the method.

A policy (one file each beside this one) subclasses :class:`Policy` and says

- ``compresses``: ``"prefill"`` (SnapKV, PyramidKV, key norm: evict after calls of more than one
  position, let single-token decoding grow the cache, as their papers and kvpress do) or
  ``"both"`` (H2O, TOVA, StreamingLLM: hold the budget after every call, decoding included);
- ``keep(layer, view, keys, budget)``: the positions each KV head keeps, ``[B, H, budget]``;
- optionally ``observe`` (running scores), ``layer_budget`` (PyramidKV's per-layer budgets),
  ``window`` (queries it reads, so recorded prefills know whether they can serve it).

**Budget**: ``budget`` positions per KV head and layer, or ``ratio`` (the default, 4): the
first compressing call (the prompt) keeps ``round(length / ratio)``, and that budget holds for
the rest of the sequence. Only full-attention layers evict; Gemma 3's sliding-window layers keep
transformers' own layer (at most ``sliding_window - 1`` positions already), as kvpress does.

**Recorded prefills**: a first call's outcome depends only on the exact prefill (eviction runs
after each layer's attention, so the forward itself is unchanged). :func:`record_prefill` runs it
once and keeps the keys, values, the last queries and H2O's column sums; ``from_record`` replays
any policy on it to the same bits as a live call. Long-context tasks use this to pay for one
prefill per example however many policies they judge (tests/test_kv_eviction.py checks the
equality).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from slimbench.methods.kvcache.hook import RecordView, install, installable
from slimbench.methods.kvcache.layer import EvictionLayer

from slimbench.config import Config
from slimbench.method import Method, MethodReport

SUPPORTED = ("llama", "gemma3_text")  # attention modules checked against the hook (tests)
RECORD_WINDOW = 64  # queries a recorded prefill keeps: the widest window a policy may read from it
QUANT = {"none": None, "int8": 8, "int4": 4}


class EvictionConfig(Config):
    ratio: float | None = Field(4.0, gt=1, le=4096, description="keep 1/ratio of the prompt's positions per layer "
                                "(the budget is fixed at the first compressing call); null: use budget")
    budget: int | None = Field(None, ge=2, le=1048576, description="positions kept per KV head and layer (set ratio: "
                               "null, or leave it unset)")
    quantize: Literal["none", "int8", "int4"] = Field("none", description="evict, then hold the kept positions as "
                                                      "per-token int8/int4 codes (kv-cache quantized's scheme)")
    score_chunk: int = Field(16, ge=1, le=8192, description="positions per forward when fidelity scores through "
                             "the cache")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.budget is not None and "ratio" not in self.model_fields_set:
            object.__setattr__(self, "ratio", None)  # `{budget: 512}` alone means a fixed budget
        if (self.budget is None) == (self.ratio is None):
            raise ValueError("set exactly one of ratio (keep 1/ratio of the prompt) and budget (positions kept); "
                             f"got ratio={self.ratio}, budget={self.budget}")
        return self

    @classmethod
    def label_keys(cls, params: dict) -> tuple[str, ...]:
        return ("ratio", "budget") + (("quantize",) if params.get("quantize", "none") != "none" else ())

    def context_problem(self, context: int) -> str | None:
        """Why this budget cannot compress a prompt of ``context`` tokens (None: it can)."""
        if self.budget is not None and self.budget >= context:
            return f"budget {self.budget} positions is not smaller than the context of {context} tokens"
        return None


class Policy:
    """One eviction rule (see the module docstring); instances hold the method's config."""

    compresses: str = "prefill"
    window = 0  # queries of the call the policy reads (0: none)
    min_budget = 2

    def __init__(self, cfg: EvictionConfig):
        self.cfg = cfg

    def base_budget(self, total: int) -> int:
        base = self.cfg.budget if self.cfg.budget is not None else round(total / self.cfg.ratio)
        return max(self.min_budget, base)

    def layer_budget(self, layer: EvictionLayer, total: int) -> int:
        return self.base_budget(total)

    def observe(self, layer: EvictionLayer, view) -> None:
        """Update running scores with this call (before ``keep``); most policies keep none."""

    def keep(self, layer: EvictionLayer, view, keys: torch.Tensor, budget: int) -> torch.Tensor:
        raise NotImplementedError


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dimension, in position order (ties: lowest index)."""
    return scores.topk(k, dim=-1, sorted=True).indices.sort(dim=-1).values


# -- the cache factory ----------------------------------------------------------------------------
def evicting_layers(config: Any) -> list[int]:
    """Indices of the layers an eviction policy manages: every full-attention layer."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return [i for i, t in enumerate(types) if t == "full_attention"]


class EvictionFactory:
    """``lm.cache_factory`` for an eviction policy: builds its cache, records and replays prefills."""

    lossy = True

    def __init__(self, policy: Policy):
        self.policy = policy
        self.score_chunk = policy.cfg.score_chunk

    def __call__(self, lm, batch_size: int, capacity: int, policy: Policy | None = None):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=lm.model.config)
        ranks = evicting_layers(lm.model.config)
        for rank, i in enumerate(ranks):
            cache.layers[i] = EvictionLayer(policy or self.policy, rank, len(ranks), QUANT[self.policy.cfg.quantize])
        return cache

    def record(self, lm, ids: torch.Tensor) -> dict[str, Any]:
        """The exact prefill of ``ids``, recorded for ``from_record`` (any policy)."""
        return record_prefill(lm, ids)

    def from_record(self, lm, record: dict[str, Any]):
        """The cache a live first call on the recorded prompt would leave (same bits)."""
        cache = self(lm, 1, record["seen"])
        tensors = record["tensors"]
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, EvictionLayer):
                keys = tensors[f"k.{i}"]
                view = RecordView(tensors[f"q.{i}"], keys, record["scaling"][str(i)], tensors[f"c.{i}"], record["seen"])
                layer.replay(keys, tensors[f"v.{i}"], view)
            else:  # a sliding-window layer: what transformers' own layer holds after the call
                layer.lazy_initialization(tensors[f"k.{i}"], tensors[f"v.{i}"])
                layer.keys, layer.values = tensors[f"k.{i}"], tensors[f"v.{i}"]
                layer.cumulative_length = record["seen"]
        return cache

    @staticmethod
    def exact_from_record(lm, record: dict[str, Any]):
        """transformers' own dynamic cache after the recorded prompt (the uncompressed model)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=lm.model.config)
        tensors = record["tensors"]
        for i, layer in enumerate(cache.layers):
            layer.lazy_initialization(tensors[f"k.{i}"], tensors[f"v.{i}"])
            layer.keys, layer.values = tensors[f"k.{i}"], tensors[f"v.{i}"]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = record["seen"]
        return cache

    def __repr__(self) -> str:
        cfg = self.policy.cfg
        size = f"budget={cfg.budget}" if cfg.budget is not None else f"ratio={cfg.ratio:g}"
        return f"EvictionFactory({type(self.policy).__name__}, {size}, quantize={cfg.quantize})"


class _Recorder(Policy):
    """Keeps everything and remembers what any policy could ask of the call."""

    compresses = "never"

    def observe(self, layer: EvictionLayer, view) -> None:
        w = min(RECORD_WINDOW, view.q)
        layer.recorded = {"q": view.window_queries(w), "c": view.colsum(), "scaling": view.scaling}


@torch.inference_mode()
def record_prefill(lm, ids: torch.Tensor) -> dict[str, Any]:
    """Run the exact prefill of ``ids`` (one sequence) once; what :meth:`EvictionFactory.from_record` needs.

    Returns ``{"tensors": {name: tensor}, "scaling": {layer: float}, "seen": T, "logits": [1, V]}``
    (safetensors-ready tensors; the caller may store it).
    """
    recorder = _Recorder(EvictionConfig(budget=2**20))
    factory = EvictionFactory(recorder)
    cache = factory(lm, 1, ids.shape[1], policy=recorder)
    before = lm.model.config._attn_implementation
    install(lm.model)
    try:
        out = lm.model(input_ids=ids.to(lm.device), cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        if before != lm.model.config._attn_implementation:
            lm.model.set_attn_implementation(before)  # a model without a policy keeps its own attention
    tensors, scaling = {}, {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictionLayer):
            tensors.update({f"k.{i}": layer.store.k, f"v.{i}": layer.store.v, f"q.{i}": layer.recorded["q"],
                            f"c.{i}": layer.recorded["c"]})
            scaling[str(i)] = layer.recorded["scaling"]
        else:
            tensors.update({f"k.{i}": layer.keys, f"v.{i}": layer.values})
    tensors["logits"] = out.logits[:, -1].float()
    return {"tensors": {k: v.contiguous() for k, v in tensors.items()}, "scaling": scaling, "seen": ids.shape[1]}


# -- bytes, analytically --------------------------------------------------------------------------
def kv_bytes_at(lm_config: Any, policy: Policy, context: int, elem: int) -> dict[str, float]:
    """KV bytes of one sequence after a prompt of ``context`` tokens: full cache vs what the policy keeps."""
    from slimbench.methods.acceleration.kv_layers import SCALE_DTYPE

    n = lm_config.num_hidden_layers
    kv_heads = lm_config.num_key_value_heads
    head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
    per_pos = 2 * kv_heads * head_dim * elem
    evicting = evicting_layers(lm_config)
    window = getattr(lm_config, "sliding_window", None) or context
    sliding = (n - len(evicting)) * min(context, window - 1) * per_pos
    bits = QUANT[policy.cfg.quantize]
    scale = torch.empty(0, dtype=SCALE_DTYPE).element_size()
    per_kept = per_pos if bits is None else 2 * kv_heads * (head_dim * bits / 8 + 2 * scale)
    kept_positions = 0
    for rank in range(len(evicting)):
        layer = EvictionLayer(policy, rank, len(evicting), None)
        kept_positions += min(context, policy.layer_budget(layer, context))
    full = len(evicting) * context * per_pos + sliding
    return {
        "full": full,
        "kept_logical": kept_positions * per_pos + sliding,
        "kept_physical": kept_positions * per_kept + sliding,
    }


# -- the method -----------------------------------------------------------------------------------
def make_method(name: str, policy_cls: type[Policy], config: type[EvictionConfig], description: str,
                version: str = "1") -> Method:
    """The registered method of one policy: checks, ``apply`` (sets ``lm.cache_factory``), its report."""

    def check(lm, cfg: EvictionConfig) -> None:
        model_type = getattr(lm.model.config, "model_type", "?")
        if model_type not in SUPPORTED:
            raise ValueError(f"{name} supports model types {', '.join(SUPPORTED)} (their attention calls the cache "
                             f"and then the attention function, which the policy hooks); {lm.name} is {model_type!r}")
        why = installable(lm.model)
        if why:
            raise ValueError(why)
        policy = policy_cls(cfg)
        if cfg.budget is not None and cfg.budget < policy.min_budget:
            raise ValueError(f"{name}: budget {cfg.budget} is below the policy's minimum of {policy.min_budget} "
                             "positions")

    def apply(lm, cfg: EvictionConfig, ctx) -> MethodReport:
        policy = policy_cls(cfg)
        install(lm.model)
        lm.cache_factory = EvictionFactory(policy)
        elem = next(p for p in lm.model.parameters() if p.is_floating_point()).element_size()
        at = 8192
        size = kv_bytes_at(lm.model.config, policy, at, elem)
        details = {
            "policy": name,
            "compresses": "prefill and decode" if policy.compresses == "both" else "prefill",
            "ratio": cfg.ratio,
            "budget": cfg.budget,
            "quantize": cfg.quantize,
            "evicting_layers": len(evicting_layers(lm.model.config)),
            "lossy": True,
            f"kv_bytes_at_{at}_full": size["full"],
            f"kv_bytes_at_{at}_kept_logical": size["kept_logical"],
            f"kv_bytes_at_{at}_kept_physical": size["kept_physical"],
            f"kept_fraction_at_{at}_logical": size["kept_logical"] / size["full"],
            f"kept_fraction_at_{at}_physical": size["kept_physical"] / size["full"],
        }
        when = ("after every forward call" if policy.compresses == "both"
                else "after prompt calls (more than one position); decoding grows the cache")
        notes = [
            f"{name} evicts {when}",
            "kept fractions at a measured context are in each long-context task record (kv_kept_fraction_*)",
            "lossy: quality tasks score through the cache",
        ]
        if len(evicting_layers(lm.model.config)) < lm.model.config.num_hidden_layers:
            notes.append("sliding-window layers keep transformers' own bounded cache; only full-attention layers evict")
        return MethodReport(execution="native", details=details, notes=notes)

    return Method(name=name, family="acceleration", description=description, config=config, apply=apply,
                  check=check, version=version, test_params={"budget": 8})
