"""Roofline arithmetic: bytes a decode step must read, FLOPs a prefill must do, KV cache bytes.

Decode (memory-bound): one decode step of a batch of ``B`` sequences reads every weight once
and each sequence's KV cache once, and produces ``B`` tokens. So, with ``r`` decode tokens/s,

    fraction = (weight_bytes + kv_bytes_read_per_step) * (r / B) / bandwidth

where ``kv_bytes_read_per_step`` is the KV cache of the whole batch at the mean context length
of the decode (a pre-allocated static cache is read whole at every step, so its full size).
Weight bytes are the model's unique tensors in memory, minus embedding tables that are only
gathered (one row per token), unless the table is also the output projection (tied weights),
which reads it whole.

Prefill (compute-bound): ``2 x`` multiply-accumulates of every linear layer (the output
projection included: the prefill computes logits at every position) per token, plus causal
attention, ``2 x 2 x layers x heads x head_dim x T(T+1)/2`` per sequence (QK^T and AV over the
keys each query may see). fraction = FLOPs / seconds / attainable FLOP/s of the dtype the
linear layers compute in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimbench.modeling import CompressedLinear, iter_linears, unique_tensors

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module under a torch.compile wrapper (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else id(t)


def weight_bytes_read_per_step(model: nn.Module) -> int:
    """Bytes of weights one forward step reads (embedding gathers excluded, see module docstring)."""
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    head_ptr = _ptr(head_w) if isinstance(head_w, torch.Tensor) else None
    gathered = {_ptr(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    gathered.discard(head_ptr)
    return sum(t.numel() * t.element_size() for t in unique_tensors(model).values() if _ptr(t) not in gathered)


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates of every linear layer (output projection included) for one token."""
    return sum(m.in_features * m.out_features if isinstance(m, CompressedLinear) else m.weight.numel()
               for _, m in iter_linears(unwrap(model), include_lm_head=True))


def attention_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head dim) from the model's config."""
    cfg = unwrap(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(layers), int(heads), int(kv_heads), int(head_dim)


def prefill_flops(model: nn.Module, batch: int, seq: int) -> float:
    """FLOPs of one forward over ``batch`` sequences of ``seq`` tokens (no past), see module docstring."""
    layers, heads, _, head_dim = attention_shape(model)
    linear = 2 * linear_macs_per_token(model) * batch * seq
    attention = 2 * 2 * layers * heads * head_dim * batch * seq * (seq + 1) / 2
    return float(linear + attention)


def compute_dtype(model: nn.Module) -> str:
    """The dtype most linear weights compute in (by weight count): the FLOP/s limit that applies.

    Weight-only int8/int4 kernels compute in bf16 here (packed.py); dynamic int8 in int8.
    """
    counts: dict[str, int] = {}
    float_dtype = next((p.dtype for p in unwrap(model).parameters() if p.is_floating_point()), torch.float32)
    for _, m in iter_linears(unwrap(model), include_lm_head=True):
        classes = {c.__name__ for c in type(m).__mro__}  # subclasses too (compile's traceable int8 layer)
        if classes & {"DynamicInt8Linear", "W8A8Linear"}:
            name = "int8"
        elif getattr(m, "kernel", None) in ("int8pack", "int4pack"):
            name = "bfloat16"
        elif isinstance(m, CompressedLinear):
            name = DTYPE_NAMES.get(float_dtype, str(float_dtype))
        else:
            name = DTYPE_NAMES.get(m.weight.dtype, str(m.weight.dtype))
        n = m.in_features * m.out_features if isinstance(m, CompressedLinear) else m.weight.numel()
        counts[name] = counts.get(name, 0) + n
    return max(counts, key=counts.get) if counts else DTYPE_NAMES.get(float_dtype, "float32")


# -- KV cache bytes -------------------------------------------------------------------------------
def _nbytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kv_cache_bytes(cache: Any) -> dict[str, Any] | None:
    """Bytes a KV cache holds now: ``logical`` (every position seen, in the cache's float dtype,
    what a plain dynamic cache would hold) and ``physical`` (what its tensors really occupy).

    Layers of our own caches answer through ``kv_bytes()``; transformers' dynamic and static
    layers are measured from their tensors. None for a cache this function does not know.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    logical = physical = positions = held_max = 0
    preallocated = False
    for layer in layers:
        if hasattr(layer, "kv_bytes"):
            b = layer.kv_bytes()
            logical, physical = logical + b["logical"], physical + b["physical"]
            positions, held_max = max(positions, b["positions"]), max(held_max, b["held"])
            preallocated = preallocated or b.get("preallocated", False)
            continue
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            continue  # not initialised (or a layer kind without keys)
        held = keys.shape[-2]
        seen = int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else held
        per_position = _nbytes(keys, values) / held if held else 0
        physical += _nbytes(keys, values)
        logical += int(per_position * seen)
        positions, held_max = max(positions, seen), max(held_max, held)
        preallocated = preallocated or getattr(layer, "max_cache_len", None) is not None
    return {"logical": logical, "physical": physical, "positions": positions, "held": held_max,
            "preallocated": preallocated}


# -- fractions ------------------------------------------------------------------------------------
def decode_roofline_fraction(weight_bytes: float, kv_read_per_step: float, tokens_per_s: float, batch: int,
                             bandwidth: float) -> float:
    """Fraction of the bandwidth roofline a decode reaches (module docstring)."""
    return (weight_bytes + kv_read_per_step) * (tokens_per_s / batch) / bandwidth


def prefill_roofline_fraction(flops: float, seconds: float, attainable_flops: float) -> float:
    return flops / seconds / attainable_flops


def kv_read_per_step(kv: dict[str, Any], prompt_len: int, new_tokens: int) -> float:
    """KV bytes one decode step reads, averaged over the decode (module docstring).

    ``kv`` was measured at the end (prompt + new tokens seen); a growing cache held, on average
    over the decode steps, ``prompt_len + new_tokens / 2`` positions' worth of it. A static cache
    is read whole at every step, and an evicting one (sliding window) stays at its cap.
    """
    if kv["preallocated"] or kv["held"] < kv["positions"]:  # full size at every step / evicting: at its cap
        return float(kv["physical"])
    end = prompt_len + new_tokens
    return kv["physical"] * (prompt_len + new_tokens / 2) / end
