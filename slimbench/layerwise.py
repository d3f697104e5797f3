"""The layer-wise calibration loop, written once for every calibration-based method.

GPTQ, SparseGPT, Wanda, AWQ and friends all follow the same sequence (IST-DASLab's
``opt_sequential``), which this module implements with a small adapter per architecture
instead of one copy of the loop per model family:

1. Run the model on the calibration batch and capture the inputs (hidden states and the
   keyword arguments: attention mask, position embeddings, ...) of the first decoder layer.
2. For each decoder layer in order, for each group of its linear layers (true-sequential
   order: q/k/v, then the attention output, then the MLP input(s), then the MLP output):
   hook the group's linears, run the layer on every calibration sample so each linear's
   ``LayerCompressor`` sees its inputs, then compress the group.
3. Run the now-compressed layer once more; its outputs are the next layer's inputs, so each
   layer is calibrated on the activations of the already-compressed layers before it.

A method provides a factory ``make(name, module) -> LayerCompressor`` with ``add_batch``
(stream one sample's inputs and outputs) and ``compress`` (act, return what it achieved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from slimbench.modeling import LINEAR_TYPES


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


class LayerCompressor(Protocol):
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Inputs [tokens, in_features] and outputs [tokens, out_features] of one sample."""

    def compress(self) -> Any:
        """Compress the layer in place; return what was achieved (stored form, stats)."""


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, device
) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering layer 0 for each calibration sample, and the layer kwargs."""
    inps: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def pre_hook(module, args, kw):
        inps.append((args[0] if args else kw["hidden_states"]).detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for sample in calib:
            with contextlib.suppress(_StopForward):
                model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)
    kwargs["use_cache"] = False
    return inps, kwargs


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def sequential(
    model: nn.Module,
    calib: torch.Tensor,
    make: Callable[[str, nn.Module], LayerCompressor],
    *,
    true_sequential: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run the loop; returns ``{full linear name: what its compressor's compress() returned}``."""
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers_path)
    inps, kwargs = capture_first_layer_inputs(model, layers, calib, device)
    results: dict[str, Any] = {}
    bar = progress(total=len(layers), desc="layers", unit="layer") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}."
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)}
        groups = adapter.groups if true_sequential else (tuple(linears),)
        missing = {n for g in groups for n in g} - set(linears)
        if missing:
            raise ValueError(f"layer {i}: adapter {adapter.name} names linears {sorted(missing)} the layer lacks")
        for group in groups:
            comps = {n: make(prefix + n, linears[n]) for n in group}
            handles = [
                linears[n].register_forward_hook(
                    lambda mod, args, out, c=comps[n]: c.add_batch(_as_tokens(args[0]), _as_tokens(out))
                )
                for n in group
            ]
            try:
                for x in inps:
                    run_layer(layer, x, kwargs)
            finally:
                for h in handles:
                    h.remove()
            for n, comp in comps.items():
                results[prefix + n] = comp.compress()
        inps = [run_layer(layer, x, kwargs) for x in inps]  # the compressed layer feeds the next
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results
