"""Splitting a model across ranks: where each architecture keeps its pieces, and each rank's share.

Pipeline parallelism keeps a contiguous slice of the decoder layers per rank; tensor
parallelism (Megatron-style) splits q/k/v and MLP up/gate by output features and the attention
output and MLP down projections by input features (``RowParallelLinear`` sums the partial
outputs). ``slimbench.engines.parallel`` runs the ranks; communication is timed here
(``timed_comm``) because the row-parallel linears call it from inside the forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


# -- architectures -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where an architecture's pieces live, relative to the *ForCausalLM model."""

    layers: str
    embed: str  # token embedding: replaced by the received hidden states on ranks > 0
    zero: tuple[str, ...] = ()  # added position embeddings: 0 on ranks > 0
    entry: tuple[str, ...] = ()  # applied after the embedding (project_in): skipped on ranks > 0
    exit: tuple[str, ...] = ()  # final norm / project_out: skipped on all but the last rank
    column: tuple[str, ...] = ()  # tensor parallel: split by output features, within a layer
    row: tuple[str, ...] = ()  # tensor parallel: split by input features, then all-reduced
    attention: str | None = None  # the attention module within a layer


LLAMA = Layout(
    layers="model.layers",
    embed="model.embed_tokens",
    exit=("model.norm",),
    column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    row=("self_attn.o_proj", "mlp.down_proj"),
    attention="self_attn",
)
LAYOUTS: dict[str, Layout] = {
    **{t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3")},
    "opt": Layout(
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        zero=("model.decoder.embed_positions",),
        entry=("model.decoder.project_in",),
        exit=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"),
        row=("self_attn.out_proj", "fc2"),
        attention="self_attn",
    ),
    # GPT-2's q/k/v are one fused Conv1D: sharding it needs a per-architecture split, not done here.
    "gpt2": Layout(
        layers="transformer.h", embed="transformer.wte", zero=("transformer.wpe",), exit=("transformer.ln_f",)
    ),
}


def layout_for(model: nn.Module, mode: str) -> Layout:
    mtype = getattr(model.config, "model_type", "?")
    layout = LAYOUTS.get(mtype)
    if layout is None or (mode == "tensor" and not layout.row):
        known = sorted(t for t, lay in LAYOUTS.items() if mode == "pipeline" or lay.row)
        raise ValueError(f"{mode} parallelism does not support model type {mtype!r}; supported: {', '.join(known)}")
    return layout


def get(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def put(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(get(root, parent) if parent else root, attr, value)


def head_counts(config) -> tuple[int, int]:
    q = getattr(config, "num_attention_heads", None) or config.n_head
    return q, getattr(config, "num_key_value_heads", None) or q


def stage_bounds(depth: int, world: int, split: list[int] | None) -> list[tuple[int, int]]:
    """[start, end) layer ranges per rank: ``split`` gives the layer count of each, else even."""
    sizes = split or [depth // world + (1 if r < depth % world else 0) for r in range(world)]
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def check_split(model: nn.Module, mode: str, world: int, split: list[int] | None) -> None:
    """Raise ValueError if the model cannot be split this way (before any process starts)."""
    layout = layout_for(model, mode)
    depth = len(get(model, layout.layers))
    if mode == "pipeline":
        if world > depth:
            raise ValueError(
                f"pipeline over {world} processes needs at least {world} decoder layers; the model has {depth}"
            )
        if split is not None and (len(split) != world or sum(split) != depth or min(split) < 1):
            raise ValueError(
                f"split {split} must give {world} positive layer counts summing to the model's {depth} layers"
            )
        return
    q, kv = head_counts(model.config)
    if q % world or kv % world:
        raise ValueError(
            f"tensor parallelism over {world} processes splits attention by whole heads: the model has "
            f"{q} query and {kv} key/value heads, not both divisible by {world}"
        )
    from slimbench.modeling import CompressedLinear

    layer0 = get(model, layout.layers)[0]
    for name in layout.column + layout.row:
        mod = get(layer0, name)
        if not isinstance(mod, nn.Linear) or isinstance(mod, CompressedLinear):
            raise ValueError(
                f"tensor parallelism shards nn.Linear weights; {name} is a {type(mod).__name__} "
                "(apply tensor parallelism before a step that replaces the linear layers)"
            )


# -- inside a worker ---------------------------------------------------------------------------
@dataclass
class Counters:
    forward_calls: int = 0
    forward_seconds: float = 0.0
    comm_seconds: float = 0.0
    comm_bytes: int = 0  # payload sent (send) or contributed (all-reduce)
    recv_bytes: int = 0
    comm_calls: int = 0


COUNTERS = Counters()  # one per worker process


def timed_comm(fn, tensor: torch.Tensor, *args, received: bool = False, **kwargs):
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    t0 = time.perf_counter()
    fn(tensor, *args, **kwargs)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    COUNTERS.comm_seconds += time.perf_counter() - t0
    COUNTERS.comm_calls += 1
    nbytes = tensor.numel() * tensor.element_size()
    if received:
        COUNTERS.recv_bytes += nbytes
    else:
        COUNTERS.comm_bytes += nbytes


class Injected(nn.Module):
    """Stands in for the token embedding on ranks > 0: returns the hidden states received."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


class Zero(nn.Module):
    """An added position embedding on ranks > 0 (rank 0 already added it)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(())


class RowParallelLinear(nn.Module):
    """A slice of a linear layer's input features; the partial outputs are summed across ranks."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = torch.nn.functional.linear(x, self.weight)
        timed_comm(dist.all_reduce, y)
        return y if self.bias is None else y + self.bias


def shard_linear(mod: nn.Linear, rank: int, world: int, dim: int) -> nn.Module:
    """This rank's slice of a linear layer: dim 0 (output features) or 1 (input features)."""
    w = mod.weight.data
    n = w.shape[dim] // world
    part = w.narrow(dim, rank * n, n).clone()
    bias = None if mod.bias is None else mod.bias.data
    if dim == 1:
        return RowParallelLinear(part, bias.clone() if bias is not None else None)
    out = nn.Linear(part.shape[1], part.shape[0], bias=bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data = part
    if bias is not None:
        out.bias.data = bias.narrow(0, rank * n, n).clone()
    return out.requires_grad_(False)


def prepare_pipeline(model: nn.Module, rank: int, world: int, layout: Layout, bounds) -> Injected | None:
    from slimbench.layerwise import drop_layers

    start, end = bounds[rank]
    drop_layers(model, list(range(start, end)))
    injected = None
    if rank > 0:
        injected = Injected()
        put(model, layout.embed, injected)
        for path in layout.zero:
            put(model, path, Zero())
        for path in layout.entry:
            if get(model, path) is not None:
                put(model, path, nn.Identity())
    if rank < world - 1:
        for path in layout.exit:
            if get(model, path) is not None:
                put(model, path, nn.Identity())
        if hasattr(model, "lm_head"):  # never called here; the last rank owns it
            model.lm_head = nn.Identity()
    return injected


def prepare_tensor(model: nn.Module, rank: int, world: int, layout: Layout) -> None:
    q_heads, kv_heads = head_counts(model.config)
    for layer in get(model, layout.layers):
        for name in layout.column:
            put(layer, name, shard_linear(get(layer, name), rank, world, 0))
        for name in layout.row:
            put(layer, name, shard_linear(get(layer, name), rank, world, 1))
        attn = get(layer, layout.attention)
        # Architectures that shape heads by attribute (OPT's num_heads) see their share of heads.
        for attr, total in (("num_heads", q_heads), ("num_key_value_heads", kv_heads), ("embed_dim", None)):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, getattr(attn, attr) // world if total is None else total // world)
