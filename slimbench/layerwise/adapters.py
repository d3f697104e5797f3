"""Where each architecture keeps its decoder layers and how their linears are grouped.

Adding an architecture to every calibration-based method is one ``ArchAdapter`` here; the
layer-wise loop, the folding of scales into norms and layer dropping read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ArchAdapter:
    """Where an architecture keeps its decoder layers and how their linears are grouped."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted attribute path from the *ForCausalLM model to the ModuleList
    groups: tuple[tuple[str, ...], ...]  # true-sequential groups of linear names within a layer
    # (norm, linears it feeds): where per-channel scales can be folded (SmoothQuant, AWQ)
    norm_linear_pairs: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())


LLAMA_LIKE = dict(
    layers_path="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ADAPTERS = (
    ArchAdapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        **LLAMA_LIKE,
        norm_linear_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    ArchAdapter(
        "gemma",
        ("gemma", "gemma2", "gemma3_text", "gemma3"),
        **LLAMA_LIKE,
        norm_linear_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    ArchAdapter(
        "opt",
        ("opt",),
        layers_path="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        norm_linear_pairs=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
    ),
    ArchAdapter(
        "gpt2",
        ("gpt2",),
        layers_path="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        norm_linear_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    ),
)


def adapter_for(model: nn.Module) -> ArchAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"no layer-wise adapter for model_type {model_type!r}; supported: {', '.join(known)}")


def has_adapter(model: nn.Module) -> bool:
    try:
        adapter_for(model)
        return True
    except ValueError:
        return False


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_path(model, adapter_for(model).layers_path)


def teacher_depth(model: nn.Module) -> int:
    """Decoder layers of the model."""
    return len(decoder_layers(model))


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only layers ``keep`` (in order) of ``model``, in place; returns the model.

    Layers are really removed: the decoder's ModuleList keeps only the chosen layers,
    ``config.num_hidden_layers`` (and a per-layer ``config.layer_types`` list, if the
    architecture has one) is updated, and each kept layer's attention ``layer_idx`` is
    renumbered so the KV cache, which is sized from the config, indexes the layers that exist.
    """
    adapter = adapter_for(model)
    parent_path, _, attr = adapter.layers_path.rpartition(".")
    parent = get_path(model, parent_path) if parent_path else model
    old = getattr(parent, attr)
    depth = len(old)
    if not keep or any(i < 0 or i >= depth for i in keep) or sorted(set(keep)) != list(keep):
        raise ValueError(f"layers to keep {keep} must be increasing indices into {depth} layers")
    setattr(parent, attr, nn.ModuleList([old[i] for i in keep]))
    for new_idx, layer in enumerate(getattr(parent, attr)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == depth:
        cfg.layer_types = [types[i] for i in keep]
    return model
