"""`structured`: remove whole MLP channels, attention heads and decoder layers.

The result is a genuinely smaller dense model: the Linear layers are sliced, the config says
the new sizes (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``num_hidden_layers``), so ``save_pretrained`` / ``from_pretrained`` round-trip it,
and the time saved is real (execution ``native``).

- MLP channels (``mlp_ratio``): channel j couples row j of the input projection(s) and column j
  of the output projection. Importance ``magnitude`` = L2 norm of those weights; ``activation``
  = RMS over calibration tokens of the channel's activation (the output projection's input)
  times the L2 norm of its output column, i.e. the size of its contribution to the residual.
- Attention heads (``attn_ratio``), Llama-shaped models only: grouped-query attention shares
  one K/V head among ``heads / kv_heads`` query heads, so whole KV groups are removed (their
  query heads, K and V rows and the matching o_proj columns). Importance as for channels, over
  the group's weights, or its o_proj input RMS times the o_proj columns' norm.
- Layers (``drop_layers``): the layers of lowest block influence (ShortGPT, Men et al. 2024),
  ``BI = 1 - mean_tokens cos(layer input, layer output)`` over the calibration tokens, go.

Every layer loses the same number of channels and heads (Hugging Face configs hold one size for
all layers). Scores come from one pass of the unpruned model over the calibration batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import adapter_for, get_path
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters, get_weight

LLAMA_TYPES = ("llama", "mistral", "qwen2")


class StructuredConfig(CalibrationConfig):
    mlp_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP channels removed in every layer")
    attn_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of KV groups (with their query heads) removed per layer"
    )
    drop_layers: int = Field(0, ge=0, description="decoder layers removed, lowest block influence first")
    importance: Literal["magnitude", "activation"] = Field("activation", description="score of channels and heads")


# -- the coupled structures of each architecture ----------------------------------------------
@dataclass(frozen=True)
class MlpSpec:
    inputs: tuple[str, ...]  # linears whose output rows are the channels
    output: str  # linear whose input columns are the channels
    size_field: str  # config field holding the channel count


MLP = {
    **{t: MlpSpec(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size") for t in LLAMA_TYPES},
    "opt": MlpSpec(("fc1",), "fc2", "ffn_dim"),
    "gpt2": MlpSpec(("mlp.c_fc",), "mlp.c_proj", "n_inner"),
}


def model_type(model: nn.Module) -> str:
    return getattr(model.config, "model_type", "?")


def layers_of(model: nn.Module) -> nn.ModuleList:
    return get_path(model, adapter_for(model).layers_path)


def slice_linear(mod: nn.Module, idx: torch.Tensor, dim: Literal["out", "in"]) -> None:
    """Keep output rows or input columns ``idx`` of a Linear/Conv1D, in place (bias follows outputs)."""
    conv = isinstance(mod, Conv1D)
    axis = {("out", False): 0, ("in", False): 1, ("out", True): 1, ("in", True): 0}[(dim, conv)]
    mod.weight = nn.Parameter(mod.weight.data.index_select(axis, idx).clone(), requires_grad=mod.weight.requires_grad)
    if dim == "out" and getattr(mod, "bias", None) is not None:
        mod.bias = nn.Parameter(mod.bias.data.index_select(0, idx).clone(), requires_grad=mod.bias.requires_grad)
    if conv:
        mod.nx, mod.nf = mod.weight.shape
    elif dim == "out":
        mod.out_features = len(idx)
    else:
        mod.in_features = len(idx)


def keep_top(score: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of the ``len(score) - remove`` highest scores."""
    return torch.sort(torch.topk(score, score.numel() - remove).indices).values


# -- calibration statistics -------------------------------------------------------------------
@dataclass
class Stats:
    mlp_sq: dict[int, torch.Tensor]  # per layer: Σ over tokens of (channel activation)²
    attn_sq: dict[int, torch.Tensor]  # per layer: Σ over tokens of (o_proj input)²
    cos_sum: dict[int, float]  # per layer: Σ over tokens of cos(layer input, layer output)
    tokens: int


def _accumulate(store: dict[int, torch.Tensor], i: int) -> Callable:
    def hook(mod, args, out):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().pow(2).sum(0).cpu()
        store[i] = store.get(i, 0) + x

    return hook


@torch.no_grad()
def collect_stats(lm, calib: torch.Tensor, cfg: StructuredConfig) -> Stats:
    model, stats = lm.model, Stats({}, {}, {}, 0)
    handles = []
    spec = MLP[model_type(model)]
    for i, layer in enumerate(layers_of(model)):
        if cfg.mlp_ratio and cfg.importance == "activation":
            handles.append(get_path(layer, spec.output).register_forward_hook(_accumulate(stats.mlp_sq, i)))
        if cfg.attn_ratio and cfg.importance == "activation":
            handles.append(layer.self_attn.o_proj.register_forward_hook(_accumulate(stats.attn_sq, i)))
        if cfg.drop_layers:
            handles.append(layer.register_forward_hook(_block_influence_hook(stats.cos_sum, i), with_kwargs=True))
    try:
        for sample in calib:
            model(input_ids=sample.unsqueeze(0).to(lm.device), use_cache=False)
            stats.tokens += sample.numel()
    finally:
        for h in handles:
            h.remove()
    return stats


def _block_influence_hook(store: dict[int, float], i: int) -> Callable:
    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double(), dim=-1)
        store[i] = store.get(i, 0.0) + float(cos.sum())

    return hook


# -- MLP channels -----------------------------------------------------------------------------
def mlp_scores(layer: nn.Module, spec: MlpSpec, sq: torch.Tensor | None, tokens: int) -> torch.Tensor:
    down = get_weight(get_path(layer, spec.output)).float()  # [hidden, channels]
    if sq is not None:  # activation: RMS of the channel times the norm of what it writes
        return (sq.float() / tokens).sqrt() * down.norm(dim=0)
    total = down.pow(2).sum(0)
    for name in spec.inputs:
        total = total + get_weight(get_path(layer, name)).float().pow(2).sum(1)
    return total.sqrt()


def prune_mlp(model: nn.Module, remove: int, stats: Stats, cfg: StructuredConfig) -> None:
    spec = MLP[model_type(model)]
    for i, layer in enumerate(layers_of(model)):
        sq = stats.mlp_sq.get(i) if cfg.importance == "activation" else None
        idx = keep_top(mlp_scores(layer, spec, sq, stats.tokens), remove)
        for name in spec.inputs:
            slice_linear(get_path(layer, name), idx, "out")
        slice_linear(get_path(layer, spec.output), idx, "in")
        mlp = get_path(layer, spec.output.rpartition(".")[0]) if "." in spec.output else layer
        if hasattr(mlp, "intermediate_size"):  # unused by forward, but a rebuild from the config has the new size
            mlp.intermediate_size = int(idx.numel())
    setattr(model.config, spec.size_field, int(idx.numel()))


# -- attention heads (whole KV groups) --------------------------------------------------------
def head_geometry(config: Any) -> tuple[int, int, int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def group_channels(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row/column indices of the heads of ``groups`` (each ``per_group`` heads of ``head_dim``)."""
    heads = (groups.unsqueeze(1) * per_group + torch.arange(per_group)).flatten()
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def attn_scores(attn: nn.Module, kv: int, rep: int, hd: int, sq: torch.Tensor | None, tokens: int) -> torch.Tensor:
    o = attn.o_proj.weight.data.float()  # [hidden, heads * hd]
    o_cols = o.pow(2).sum(0).view(kv, rep * hd).sum(1)
    if sq is not None:
        return ((sq.float() / tokens).view(kv, rep * hd).sum(1) * o_cols).sqrt()
    q = attn.q_proj.weight.data.float().pow(2).sum(1).view(kv, rep * hd).sum(1)
    k = attn.k_proj.weight.data.float().pow(2).sum(1).view(kv, hd).sum(1)
    v = attn.v_proj.weight.data.float().pow(2).sum(1).view(kv, hd).sum(1)
    return (q + k + v + o_cols).sqrt()


def prune_heads(model: nn.Module, remove: int, stats: Stats, cfg: StructuredConfig) -> None:
    heads, kv, hd = head_geometry(model.config)
    rep = heads // kv
    for i, layer in enumerate(layers_of(model)):
        attn = layer.self_attn
        sq = stats.attn_sq.get(i) if cfg.importance == "activation" else None
        groups = keep_top(attn_scores(attn, kv, rep, hd, sq, stats.tokens), remove)
        q_idx, kv_idx = group_channels(groups, rep, hd), group_channels(groups, 1, hd)
        slice_linear(attn.q_proj, q_idx, "out")
        slice_linear(attn.k_proj, kv_idx, "out")
        slice_linear(attn.v_proj, kv_idx, "out")
        slice_linear(attn.o_proj, q_idx, "in")
    model.config.head_dim = hd  # no longer hidden_size / heads: say it explicitly
    model.config.num_key_value_heads = kv - remove
    model.config.num_attention_heads = (kv - remove) * rep


# -- layers ---------------------------------------------------------------------------------
def drop_layers(model: nn.Module, drop: list[int]) -> None:
    path = adapter_for(model).layers_path
    parent_path, attr = path.rsplit(".", 1)
    kept = [layer for i, layer in enumerate(layers_of(model)) if i not in set(drop)]
    for new_idx, layer in enumerate(kept):  # the KV cache is indexed by layer_idx
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    setattr(get_path(model, parent_path), attr, nn.ModuleList(kept))
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in set(drop)]


# -- the method -------------------------------------------------------------------------------
def removal_counts(model: nn.Module, cfg: StructuredConfig) -> dict[str, int]:
    """Channels, KV groups and layers to remove; raises when a setting would remove everything."""
    mt = model_type(model)
    if mt not in MLP:
        raise ValueError(f"structured pruning supports model types {sorted(MLP)}, not {mt!r}")
    n_layers = len(layers_of(model))
    ffn = get_weight(get_path(layers_of(model)[0], MLP[mt].output)).shape[1]
    out = {"mlp_channels": round(cfg.mlp_ratio * ffn), "kv_groups": 0, "layers": cfg.drop_layers}
    if out["mlp_channels"] >= ffn:
        raise ValueError(f"mlp_ratio {cfg.mlp_ratio} would remove all {ffn} MLP channels of every layer")
    if cfg.attn_ratio:
        if mt not in LLAMA_TYPES:
            raise ValueError(
                f"attention-head removal supports Llama-shaped models only; {mt} derives head_dim from "
                "hidden_size / heads, so its heads cannot be removed: set attn_ratio 0"
            )
        _, kv, _ = head_geometry(model.config)
        out["kv_groups"] = round(cfg.attn_ratio * kv)
        if out["kv_groups"] >= kv:
            raise ValueError(f"attn_ratio {cfg.attn_ratio} would remove all {kv} KV groups (every head) of every layer")
    if cfg.drop_layers >= n_layers:
        raise ValueError(f"drop_layers {cfg.drop_layers} would remove every one of the {n_layers} decoder layers")
    return out


def check(lm, cfg: StructuredConfig) -> None:
    removal_counts(lm.model, cfg)


@torch.no_grad()
def apply(lm, cfg: StructuredConfig, ctx) -> MethodReport:
    model = lm.model
    counts = removal_counts(model, cfg)
    before = count_parameters(model)
    needs_data = cfg.drop_layers > 0 or (
        cfg.importance == "activation" and (counts["mlp_channels"] or counts["kv_groups"])
    )
    details: dict[str, Any] = {"parameters_before": before, "importance": cfg.importance}
    stats = Stats({}, {}, {}, 1)
    if needs_data:
        calib, details["calibration"] = sample_calibration(lm, cfg)
        stats = collect_stats(lm, calib, cfg)
    heads_before = head_geometry(model.config)[:2] if model_type(model) in LLAMA_TYPES else None
    if counts["mlp_channels"]:
        prune_mlp(model, counts["mlp_channels"], stats, cfg)
    if counts["kv_groups"]:
        prune_heads(model, counts["kv_groups"], stats, cfg)
    if cfg.drop_layers:
        bi = {i: 1 - stats.cos_sum[i] / stats.tokens for i in sorted(stats.cos_sum)}
        drop = sorted(sorted(bi, key=bi.get)[: cfg.drop_layers])
        drop_layers(model, drop)
        details["block_influence"] = {str(i): round(v, 5) for i, v in bi.items()}
        details["dropped_layers"] = drop
    after = count_parameters(model)
    details.update(
        parameters_after=after,
        parameters_removed_fraction=1 - after / before,
        removed={
            "mlp_channels_per_layer": counts["mlp_channels"],
            "kv_groups_per_layer": counts["kv_groups"],
            "layers": cfg.drop_layers,
        },
        shape_after=_shape(model),
    )
    if heads_before:
        details["heads_before"] = {"query": heads_before[0], "kv": heads_before[1]}
    return MethodReport(
        execution="native", details=details, notes=["a smaller dense model: sliced Linear layers, updated config"]
    )


def _shape(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    keys = (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        MLP[model_type(model)].size_field,
    )
    return {k: getattr(cfg, k, None) for k in keys}


METHOD = Method(
    name="structured",
    family="pruning",
    description="structured pruning: MLP channels, KV-group heads, layers (block influence); a smaller dense model",
    config=StructuredConfig,
    apply=apply,
    check=check,
    # it draws data only for layer influence or activation importance
    calibration_need=lambda c: "activation-statistics" if c.drop_layers or (
        c.importance == "activation" and (c.mlp_ratio or c.attn_ratio)) else None,
    changes_shapes=True,
    follows=("precision", "distillation"),  # earlier stored forms would describe removed channels
    test_params={"mlp_ratio": 0.25},  # the defaults remove nothing
)
