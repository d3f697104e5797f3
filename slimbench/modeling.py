"""Walking a model's weights: which layers methods compress, and what the model weighs.

Methods never hard-code a model family: they ask this module for the linear layers
(``nn.Linear`` and GPT-2's transposed ``Conv1D``) and read/write weights as ``[out, in]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from safetensors.torch import save as safetensors_save
from torch import nn
from transformers.pytorch_utils import Conv1D


class Rebuildable:
    """A module type the artifact cache (slimbench/sweep/artifacts/cache.py) can save and rebuild.

    Its tensors are its parameters and buffers (saved through safetensors); its structure is
    the JSON-able ``artifact_spec()``, from which ``from_artifact_spec`` builds an empty module
    of the same layout that loading the tensors then fills. The cache stores the class by its
    import path and refuses any class that is not a Rebuildable, so nothing else is ever
    constructed from a cache entry. Bump ``artifact_version`` when the layout changes: entries
    of another version are rebuilt instead of loaded.

    A module that wraps or re-types the one it replaces (a rotation around an embedding, a
    linear whose inputs are fake-quantized) sets ``wraps``: ``from_artifact_spec`` then also
    receives the module the rebuilt model holds at its place. ``on_attach`` runs once the module
    is set on its parent, for state that lives on the parent (an attention's implementation).
    """

    artifact_version: ClassVar[str] = "1"
    wraps: ClassVar[bool] = False

    def artifact_spec(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not describe itself for the artifact cache")

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any], existing: nn.Module | None = None) -> nn.Module:
        raise NotImplementedError(f"{cls.__name__} cannot be rebuilt by the artifact cache")

    def on_attach(self, parent: nn.Module) -> None:
        """Called by the rebuild after the module is set on ``parent``; nothing by default."""


class CompressedLinear(nn.Module, Rebuildable):
    """Base for linear layers held in a compressed form that a real kernel executes.

    Subclasses keep their stored tensors (packed codes, scales, ...) as registered
    parameters or buffers, so ``state_dict()`` is the real compressed checkpoint, and
    implement the two methods below so the harness can measure them like any linear layer,
    plus Rebuildable's two so a compressed model can be saved and reloaded.
    """

    in_features: int
    out_features: int

    def dequantized_weight(self) -> torch.Tensor:
        """The [out, in] float weight this layer computes with."""
        raise NotImplementedError

    def weight_storage(self) -> dict[str, torch.Tensor]:
        """The tensors that store the weight (not the bias)."""
        raise NotImplementedError


LINEAR_TYPES = (nn.Linear, Conv1D, CompressedLinear)


def output_embedding_ids(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    return {id(head)} if head is not None else set()


def iter_linears(model: nn.Module, *, include_lm_head: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every linear layer; the lm_head is left out unless asked for.

    Embeddings are never linear layers here: they are ``nn.Embedding``.
    """
    skip = set() if include_lm_head else output_embedding_ids(model)
    for name, mod in model.named_modules():
        if isinstance(mod, LINEAR_TYPES) and id(mod) not in skip:
            yield name, mod


def get_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (Conv1D stores it transposed)."""
    if isinstance(mod, CompressedLinear):
        return mod.dequantized_weight()
    return mod.weight.data.t() if isinstance(mod, Conv1D) else mod.weight.data


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Write a [out, in] weight back in the module's own layout and dtype."""
    if isinstance(mod, CompressedLinear):
        raise TypeError(f"{type(mod).__name__} is already compressed; its weight cannot be overwritten")
    w = w.t() if isinstance(mod, Conv1D) else w
    mod.weight.data.copy_(w.to(mod.weight.dtype))


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, each shared tensor once (tied embeddings)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def linear_numel(mod: nn.Module) -> int:
    return mod.in_features * mod.out_features if isinstance(mod, CompressedLinear) else mod.weight.numel()


def count_parameters(model: nn.Module) -> int:
    """Logical parameters: float parameters, plus the weights compressed linears stand for."""
    params = {id(p): p for p in model.parameters()}
    compressed = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    for m in compressed:  # their stored tensors are not the parameter count
        for t in m.weight_storage().values():
            params.pop(id(t), None)
    return sum(p.numel() for p in params.values()) + sum(linear_numel(m) for m in compressed)


def memory_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors occupy in memory now (what the dense model really holds)."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(model).values())


def sparsity_stats(model: nn.Module) -> dict[str, Any]:
    """Measured fraction of exact zeros over the linear layers: overall, per-layer min and max."""
    zeros = total = 0
    per_layer = []
    for _, mod in iter_linears(model):
        w = get_weight(mod)
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_layer.append(z / w.numel())
    return {
        "sparsity": zeros / total if total else 0.0,
        "sparsity_layer_min": min(per_layer, default=0.0),
        "sparsity_layer_max": max(per_layer, default=0.0),
        "linear_weights": total,
    }


def storage_state(model: nn.Module, storage: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The flat tensor dict a compressed checkpoint holds.

    ``storage`` maps a parameter name (``"...q_proj.weight"``) to the tensors of its stored form
    (packed codes, scales, zero-points); every other tensor is stored as it is in memory.
    """
    flat: dict[str, torch.Tensor] = {}
    for name, t in unique_tensors(model).items():
        if name in storage:
            for part, pt in storage[name].items():
                flat[f"{name}.{part}"] = pt.contiguous()
        else:
            flat[name] = t.contiguous()
    missing = set(storage) - set(unique_tensors(model))
    if missing:
        raise KeyError(f"storage names parameters the model does not have: {sorted(missing)[:3]}")
    return flat


def serialized_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Real bytes of a safetensors file holding these tensors (header included)."""
    return len(safetensors_save({k: v.detach().cpu() for k, v in tensors.items()}))
