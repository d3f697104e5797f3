"""Saving a compressed model in its own formats, and rebuilding it, through safetensors only.

What a saved model is (files of one artifact-cache entry, see slimbench/sweep/artifacts/cache.py):

- ``config.json``: the model's config as it is *after* compression (structured pruning and
  layer dropping change its sizes), so the architecture is rebuilt without the original weights.
- ``model.safetensors``: every tensor of the model once (tied tensors once). Where a method
  reported a stored form of a weight (``MethodReport.storage``: packed codes + scales, a sparse
  bitmask + values, N:M values + indices, ...) and that form decodes to the in-memory weight
  exactly, the form is saved instead of the dense tensor. So the file holds what the record's
  ``stored_bytes`` counts, and its size equals it; a weight whose form does not decode exactly
  (AWQ's fp16 ``input_scale``, a form left stale by a later step) is saved dense, and the layout
  says which and why.
- ``buffers.safetensors``: non-persistent buffers (rotary frequencies, ...): a cast changes them too.
- the layout (a JSON dict kept in the manifest): model class, attention implementation, the
  compressed modules (:class:`slimbench.modeling.Rebuildable`: PackedLinear, W8A8Linear,
  DynamicInt8Linear, FactorizedLinear, ...) by import path with their JSON spec, the stored forms,
  the tied aliases and the dense fallbacks.

Rebuilding: the model class (a ``transformers`` class, nothing else) is built from the config
with weight initialisation skipped, the Rebuildable modules are swapped in from their specs, and
every parameter and buffer is set from the files (decoding stored forms). At save time the same
rebuild runs on the meta device and its structure (module types, tensor names and shapes, which
tensors are shared, simple module attributes) must equal the compressed model's; otherwise the
model is not cacheable (``NotCacheable``), never pickled.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimbench.config import canonical_json
from slimbench.modeling import Rebuildable, unique_tensors

WEIGHTS = "model.safetensors"
BUFFERS = "buffers.safetensors"
CONFIG = "config.json"


class NotCacheable(Exception):
    """Why a compressed model cannot be saved in its own formats (said in the record)."""


# -- stored forms: decode what MethodReport.storage holds ----------------------------------------
def decode_form(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, transposed: bool):
    """(codec name, the parameter a stored form stands for) in the parameter's layout and dtype."""
    from slimbench.methods.pruning.sparse_format import decode_param
    from slimbench.methods.quantization.grid import decode_stored_form

    if "bitmask" in parts or "nm" in parts:
        return "sparse", decode_param(parts, dtype)
    if set(parts) == {"dense"}:
        return "dense", parts["dense"].to(dtype)
    if {"qweight", "scales"} <= set(parts):
        extra = set(parts) - {"qweight", "scales", "qzeros", "g_idx"}
        if extra:
            # AWQ's ``input_scale`` holds 1/s in fp16 while the layer computes with Q(W s) / s:
            # s cannot be recovered exactly from it, so such a layer is saved dense.
            raise ValueError(f"parts {sorted(extra)} do not give the in-memory weight exactly")
        out_f, in_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        w = decode_stored_form(parts, out_f, in_f).to(dtype)
        return "grid", (w.t().contiguous() if transposed else w)
    raise ValueError(f"unknown stored form with parts {sorted(parts)}")


def owner_is_conv1d(model: nn.Module, name: str) -> bool:
    owner = name.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), Conv1D) if owner else False


def weights_to_save(model: nn.Module, storage: dict[str, dict[str, torch.Tensor]]):
    """(flat tensors of model.safetensors, stored forms used, dense fallbacks with reasons)."""
    flat: dict[str, torch.Tensor] = {}
    forms: dict[str, dict[str, Any]] = {}
    fallback: dict[str, str] = {}
    for name, t in unique_tensors(model).items():
        parts = storage.get(name)
        if parts is not None:
            transposed = owner_is_conv1d(model, name)
            try:
                codec, decoded = decode_form(parts, tuple(t.shape), t.dtype, transposed)
                exact = decoded.shape == t.shape and torch.equal(decoded.cpu(), t.detach().cpu())
                why = None if exact else "its stored form does not decode to the in-memory weight exactly"
            except (ValueError, KeyError, RuntimeError) as exc:
                why = f"its stored form cannot be decoded: {exc}"
            if why is None:
                for part, pt in parts.items():
                    flat[f"{name}.{part}"] = pt.detach().contiguous().cpu()
                forms[name] = {"codec": codec, "parts": sorted(parts), "shape": list(t.shape),
                               "dtype": str(t.dtype).removeprefix("torch."), "transposed": transposed}
                continue
            fallback[name] = f"saved dense: {why}"
        flat[name] = t.detach().contiguous().cpu()
    return flat, forms, fallback


# -- structure ---------------------------------------------------------------------------------
def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it has (tied tensors under each)."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict(keep_vars=True))
    out, seen = {}, set()
    for name, b in model.named_buffers(remove_duplicate=False):
        if name not in persistent and id(b) not in seen:
            seen.add(id(b))
            out[name] = b.detach().contiguous().cpu()
    return out


def aliases(model: nn.Module, saved: set[str]) -> dict[str, str]:
    """{tensor name not saved: the saved name of the same tensor} (tied weights)."""
    by_id: dict[int, str] = {}
    for name, t in named_tensors(model):
        if name in saved:
            by_id.setdefault(id(t), name)
    canon_ptr = {}
    for name, t in named_tensors(model):
        if name in saved:
            canon_ptr.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), name)
    out = {}
    for name, t in named_tensors(model):
        if name in saved:
            continue
        target = by_id.get(id(t)) or canon_ptr.get((t.data_ptr(), tuple(t.shape), t.dtype))
        if target is None:
            raise NotCacheable(f"tensor {name} shares memory with another tensor as a different view")
        out[name] = target
    return out


def _simple(v: Any) -> bool:
    if isinstance(v, bool | int | float | str | type(None)):
        return True
    if isinstance(v, list | tuple):
        return all(_simple(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _simple(x) for k, x in v.items())
    return False


def structure(model: nn.Module) -> dict[str, Any]:
    """What must match between a compressed model and its rebuild, dtypes and values aside."""
    groups: dict[int, list[str]] = {}
    shapes = {}
    for name, t in named_tensors(model):
        shapes[name] = list(t.shape)
        groups.setdefault(id(t), []).append(name)
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "modules": {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in modules},
        "tensors": shapes,
        "shared": sorted(sorted(g) for g in groups.values() if len(g) > 1),
        # Plain attributes (sizes, flags, layer indices): a method that changed one the config
        # does not say would be silently undone by a rebuild.
        "attributes": {n: canonical_json(plain_attributes(m)) for n, m in modules},
    }


def plain_attributes(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and _simple(v)}


def structure_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for part in ("modules", "tensors", "attributes"):
        for name in sorted(set(a[part]) | set(b[part])):
            if a[part].get(name) != b[part].get(name):
                out.append(f"{part[:-1]} {name or '(model)'}: {a[part].get(name)} vs rebuilt {b[part].get(name)}")
    if a["shared"] != b["shared"]:
        out.append(f"shared tensors {a['shared']} vs rebuilt {b['shared']}")
    return out


# -- layout and rebuild --------------------------------------------------------------------------
def model_class(model: nn.Module) -> type:
    import transformers

    cls = type(model)
    if getattr(transformers, cls.__name__, None) is not cls:
        raise NotCacheable(
            f"the model is a {cls.__module__}.{cls.__qualname__}, not a transformers model class; "
            "only those are rebuilt from a config"
        )
    return cls


def compressed_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{name: {type, version, spec}} of every Rebuildable module, outer before inner.

    Rebuilding in this order nests correctly: a FactorizedLinear first brings plain factors,
    which a later entry (its int8 ``down``, say) then replaces.
    """
    out: dict[str, dict[str, Any]] = {}
    first: dict[int, str] = {}
    shared: list[str] = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, Rebuildable) or any(name.startswith(f"{s}.") for s in shared):
            continue
        if id(mod) in first:  # one module at several places (QuaRot's per-model rotations): shared again
            out[name] = {"same_as": first[id(mod)]}
            shared.append(name)
            continue
        first[id(mod)] = name
        try:
            spec = json.loads(json.dumps(mod.artifact_spec()))  # what the entry will hold, exactly
        except (NotImplementedError, TypeError, ValueError) as exc:
            raise NotCacheable(f"module {name} ({type(mod).__name__}) cannot describe itself: {exc}") from None
        cls = type(mod)
        out[name] = {"type": f"{cls.__module__}:{cls.__qualname__}", "version": cls.artifact_version, "spec": spec}
    return out


def rebuildable_class(path: str, version: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Rebuildable) and issubclass(obj, nn.Module)):
        raise ValueError(f"{path} is not a Rebuildable module class")
    if obj.artifact_version != version:
        raise ValueError(f"{path} is at layout version {obj.artifact_version}, the entry holds version {version}")
    return obj


def layout_of(model: nn.Module) -> dict[str, Any]:
    cls = model_class(model)
    return {
        "model_class": cls.__name__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "config": model.config.to_dict(),
        "modules": compressed_modules(model),
    }


def build(layout: dict[str, Any], dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """The model skeleton a layout describes: uninitialised tensors, compressed modules swapped in."""
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, layout["model_class"])
    config = cls.config_class.from_dict(dict(layout["config"]))
    kwargs = {"attn_implementation": layout["attn_implementation"]} if layout["attn_implementation"] else {}
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, dtype=dtype, **kwargs)
    with torch.device(device):
        model.tie_weights()  # skipped with the initialisation; the config says which are tied
        for name, m in layout["modules"].items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if "same_as" in m:
                new = model.get_submodule(m["same_as"])
            else:
                cls = rebuildable_class(m["type"], m["version"])
                new = cls.from_artifact_spec(m["spec"], getattr(parent, child)) if cls.wraps else \
                    cls.from_artifact_spec(m["spec"])
            setattr(parent, child, new)
            new.on_attach(parent)
    return model


def check_rebuild(model: nn.Module, layout: dict[str, Any], dtype: torch.dtype) -> None:
    """Rebuild on the meta device (no memory) and compare structures; raise NotCacheable if they differ."""
    try:
        skeleton = build(layout, dtype, "meta")
    except Exception as exc:  # any failure to rebuild means: not cacheable
        raise NotCacheable(f"the model cannot be rebuilt from its config: {type(exc).__name__}: {exc}") from None
    diff = structure_differences(structure(model), structure(skeleton))
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise NotCacheable("rebuilding from the config gives another structure: " + "; ".join(diff[:3]) + more)
    if canonical_json(_without_dtype(skeleton.config.to_dict())) != canonical_json(_without_dtype(layout["config"])):
        raise NotCacheable("the model's config does not survive a JSON round trip")


def _without_dtype(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("dtype", "torch_dtype")}


def check_executable(lm) -> None:
    """Acceleration hooks change how the model runs; a rebuilt module would not carry them."""
    if lm.cache_factory is not None or lm.generator is not None:
        raise NotCacheable("an acceleration hook (cache_factory / generator) is set: execution, not weights")
    for name, m in lm.model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            raise NotCacheable(f"module {name or '(model)'} has forward hooks, which cannot be saved")


# -- save and load -------------------------------------------------------------------------------
def save(lm, storage: dict[str, dict[str, torch.Tensor]], folder: Path) -> dict[str, Any]:
    """Write config, weights and buffers of ``lm.model`` into ``folder``; return the layout.

    Raises NotCacheable before writing anything if the model cannot be rebuilt from its files.
    """
    check_executable(lm)
    model = lm.model
    layout = layout_of(model)
    # The skeleton's dtype only matters until every tensor is replaced by the saved one (in
    # its saved dtype): the model's first parameter's keeps the transient copy small.
    dtype = next(model.parameters()).dtype
    layout["build_dtype"] = str(dtype).removeprefix("torch.")
    check_rebuild(model, layout, dtype)
    flat, forms, fallback = weights_to_save(model, storage)
    saved = {n for n in unique_tensors(model) if n in flat or n in forms}
    buffers = non_persistent_buffers(model)
    layout.update(forms=forms, dense_fallback=fallback, aliases=aliases(model, saved | set(buffers)),
                  buffers=sorted(buffers))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(layout["config"], indent=1, sort_keys=True))
    save_file(flat, str(folder / WEIGHTS))  # no metadata: the file's size is the record's stored_bytes
    if buffers:
        save_file(buffers, str(folder / BUFFERS))
    return layout


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _get(f, key: str) -> torch.Tensor:
    # safetensors hands out tensors 8 bytes off a 64-byte boundary; the int8/int4 CPU kernels
    # crash on such memory (and any kernel may run at another speed), so each tensor is copied
    # into memory from torch's own allocator, like the tensors of a freshly compressed model.
    return f.get_tensor(key).clone()


def read_tensors(folder: Path, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{tensor name: tensor} from the files, stored forms decoded."""
    out: dict[str, torch.Tensor] = {}
    forms = layout["forms"]
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for name, form in forms.items():
            parts = {p: _get(f, f"{name}.{p}") for p in form["parts"]}
            keys -= {f"{name}.{p}" for p in form["parts"]}
            out[name] = decode_form(parts, tuple(form["shape"]), _dtype(form["dtype"]), form["transposed"])[1]
        for k in keys:
            out[k] = _get(f, k)
    if layout["buffers"]:
        with safe_open(str(folder / BUFFERS), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = _get(f, k)
    return out


def stored_forms(folder: Path, layout: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """{weight name: its stored form's parts} as the method reported them, read back from the files
    (what an export needs to write a method's own grid exactly)."""
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return {name: {p: _get(f, f"{name}.{p}") for p in form["parts"]} for name, form in layout["forms"].items()}


def load(folder: Path, layout: dict[str, Any]) -> nn.Module:
    """Rebuild the model an entry holds (on the CPU), every tensor set from the files."""
    model = build(layout, _dtype(layout["build_dtype"]))
    tensors = read_tensors(folder, layout)
    named = dict(named_tensors(model))
    for name, t in named.items():
        src = name if name in tensors else layout["aliases"].get(name)
        if src is None or src not in tensors:
            raise ValueError(f"the entry has no tensor for {name}")
        if tuple(tensors[src].shape) != tuple(t.shape):
            raise ValueError(f"tensor {name}: shape {tuple(tensors[src].shape)} in the entry, {tuple(t.shape)} rebuilt")
        t.data = tensors[src]  # keeps the Parameter object, so tied weights stay tied; takes the saved dtype
    for name in tensors:
        if name not in named:
            raise ValueError(f"the entry holds tensor {name}, which the rebuilt model does not have")
    return model.eval()
