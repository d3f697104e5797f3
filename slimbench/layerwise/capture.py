"""What the calibration samples feed each decoder layer, and the loop as first written."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from slimbench.layerwise.adapters import adapter_for, get_path
from slimbench.layerwise.bits import same_args
from slimbench.modeling import LINEAR_TYPES


class LayerCompressor(Protocol):
    """Optionally ``needs_output = False`` (class attribute): add_batch never reads ``out``, so
    the loop may pass ``None`` and skip computing the output of a group's last linear."""

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None) -> None:
        """Inputs [tokens, in_features] and outputs [tokens, out_features] of one sample."""

    def compress(self) -> Any:
        """Compress the layer in place; return what was achieved (stored form, stats)."""


class StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What the calibration samples feed the decoder layers, as the model's own forward gives it.

    ``hidden[j]``: the hidden states entering layer 0 for sample ``j``. ``kwargs[j][i]``: every
    other argument layer ``i`` receives for sample ``j`` (attention mask, rotary position
    embeddings, position ids, ...), by name. Layers do not all get the same ones: Gemma 2/3
    alternate sliding-window layers (local rotary base, banded mask) with global layers (another
    rotary base, full causal mask), so each layer is calibrated with its own. Equal arguments are
    one and the same dict (every layer of Llama, OPT and GPT-2; every sample of one length).
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]

    def for_layer(self, i: int) -> list[dict[str, Any]]:
        """Layer ``i``'s keyword arguments, one dict per sample."""
        return [per_layer[i] for per_layer in self.kwargs]


# Arguments never replayed: the loop runs each layer with no KV cache.
_CACHE_ARGS = ("past_key_values", "cache", "layer_past", "past_key_value")


def _by_name(layer: nn.Module, args: tuple, kw: dict) -> dict[str, Any]:
    """The call's arguments other than the hidden states, all by name (GPT-2's blocks get their
    mask positionally), without the cache, with ``use_cache=False``."""
    named = {k: v for k, v in kw.items() if k != "hidden_states"}
    if len(args) > 1:
        params = [p for p in inspect.signature(layer.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) < len(args) or any(p.kind is p.POSITIONAL_ONLY for p in params[1 : len(args)]):
            raise ValueError(f"{type(layer).__name__}.forward takes positional arguments the layer-wise loop "
                             "cannot pass by name")
        named = {**{p.name: a for p, a in zip(params[1:], args[1:], strict=False)}, **named}
    for k in _CACHE_ARGS:
        named.pop(k, None)
    named["use_cache"] = False
    return named


def _forward_capture(model: nn.Module, layers: nn.ModuleList, sample: torch.Tensor, device,
                     depth: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Forward one sample until layer ``depth - 1`` is entered: (hidden states entering layer 0,
    the arguments of layers ``0..depth-1``). The layers after it, and the head, never run."""
    hidden: list[torch.Tensor] = []
    got: dict[int, dict[str, Any]] = {}

    def pre_hook(i):
        def hook(module, args, kw):
            if i == 0:  # a copy if the layers run on: one of them might write it in place
                x = (args[0] if args else kw["hidden_states"]).detach()
                hidden.append(x.clone() if depth > 1 else x)
            got.setdefault(i, _by_name(module, args, kw))
            if len(got) == depth:
                raise StopForward

        return hook

    handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(depth)]
    try:
        with contextlib.suppress(StopForward):
            model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(got) < depth or not hidden:
        missing = sorted(set(range(depth)) - set(got))
        raise ValueError(f"the model's forward never ran decoder layer(s) {missing}; the layer-wise loop "
                         "calibrates every layer of the adapter's layer list")
    return hidden[0], [got[i] for i in range(depth)]


def _shared(per_layer: list[dict[str, Any]], seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each layer's arguments, replaced by an equal dict already in ``seen`` where there is one."""
    out = []
    for kw in per_layer:
        same = next((s for s in seen if s is kw or same_args(s, kw)), None)
        if same is None:
            seen.append(kw)
            same = kw
        out.append(same)
    return out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, device) -> LayerInputs:
    """Hidden states entering layer 0 for each calibration sample, and every layer's arguments.

    The first sample runs through the whole stack (up to the last layer's entry) to record what
    the model gives each layer; each other sample runs only up to layer 0. A sample whose layer-0
    arguments differ from the first's (another length, a padding mask) gets its own full capture:
    what a layer is given depends on the token ids and positions, never on the hidden states (the
    loop replays it on compressed activations), so equal layer-0 arguments mean equal ones for
    every layer.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = []
    seen: list[dict[str, Any]] = []
    for j, sample in enumerate(calib):
        x, first = _forward_capture(model, layers, sample, device, len(layers) if j == 0 else 1)
        hidden.append(x)
        if j > 0 and same_args(first[0], kwargs[0][0]):
            kwargs.append(kwargs[0])
            continue
        if len(first) < len(layers):
            first = _forward_capture(model, layers, sample, device, len(layers))[1]
        kwargs.append(_shared(first, seen))
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def sequential_reference(
    model: nn.Module,
    calib: torch.Tensor,
    make: Callable[[str, nn.Module], LayerCompressor],
    *,
    true_sequential: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """The loop as first written: every pass runs the whole layer on every sample.

    Kept as the definition :func:`sequential` must reproduce bit for bit (tests, loop-bench).
    """
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers_path)
    captured = capture_layer_inputs(model, layers, calib, device)
    inps = captured.hidden
    results: dict[str, Any] = {}
    bar = progress(total=len(layers), desc="layers", unit="layer") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}."
        kwargs = captured.for_layer(i)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)}
        groups = adapter.groups if true_sequential else (tuple(linears),)
        missing = {n for g in groups for n in g} - set(linears)
        if missing:
            raise ValueError(f"layer {i}: adapter {adapter.name} names linears {sorted(missing)} the layer lacks")
        for group in groups:
            comps = {n: make(prefix + n, linears[n]) for n in group}
            handles = [
                linears[n].register_forward_hook(
                    lambda mod, args, out, c=comps[n]: c.add_batch(as_tokens(args[0]), as_tokens(out))
                )
                for n in group
            ]
            try:
                for x, kw in zip(inps, kwargs, strict=True):
                    run_layer(layer, x, kw)
            finally:
                for h in handles:
                    h.remove()
            for n, comp in comps.items():
                results[prefix + n] = comp.compress()
        inps = [run_layer(layer, x, kw) for x, kw in zip(inps, kwargs, strict=True)]  # feeds the next layer
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results
