"""Building a shallower student from a teacher (no METHOD here).

Layers are really removed: the decoder's ModuleList keeps only the chosen layers,
``config.num_hidden_layers`` (and a per-layer ``config.layer_types`` list, if the architecture
has one) is updated, and each kept layer's attention ``layer_idx`` is renumbered so the KV
cache, which is sized from the config, indexes the layers that exist. The kept layers' weights
are the teacher's own (DistilBERT-style initialisation).
"""

from __future__ import annotations

from torch import nn

from slimbench.layerwise import adapter_for, get_path


def teacher_depth(model: nn.Module) -> int:
    return len(get_path(model, adapter_for(model).layers_path))


def kept_layers(depth: int, keep_every: int | None, student_layers: int | None) -> list[int]:
    """Indices of the teacher layers the student keeps.

    ``keep_every=k``: layers 0, k, 2k, ... (DistilBERT's every-other-layer with k=2).
    ``student_layers=n``: n layers evenly spaced from the first to the last (both kept: the
    first and last layers are the ones whose removal hurts most).
    """
    if student_layers is not None:
        if student_layers > depth:
            raise ValueError(f"student_layers {student_layers} is deeper than the teacher's {depth} decoder layers")
        if student_layers == 1:
            return [0]
        return sorted({round(i * (depth - 1) / (student_layers - 1)) for i in range(student_layers)})
    k = keep_every or 2
    return list(range(0, depth, k))


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only layers ``keep`` (in order) of ``model``, in place; returns the model."""
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
