"""A model split across worker processes: pipeline (layers) or tensor (weights) parallelism.

Both run in ``WorkerGroup`` processes that form a ``torch.distributed`` group (gloo on CPU,
NCCL on CUDA, rendezvous on 127.0.0.1 at a free port). The cell's process keeps a
``DistributedModel``: a module with the call contract of ``slimbench.lm`` that sends each call
to every rank and returns the logits the last (pipeline) or first (tensor) rank computed.

- Pipeline: rank r holds a contiguous slice of the decoder layers (``drop_layers`` keeps them and
  renumbers their cache indices); rank 0 also embeds, the last rank also applies the final norm
  and the output projection. Rank r > 0 receives the hidden states of rank r - 1 through
  ``dist.recv`` and feeds them to its first layer by standing in for the embedding (the
  position embedding, where the architecture adds one, returns 0 there), so the architecture's
  own forward (masks, rotary positions from its own cache length) runs unchanged.
- Tensor (Megatron-style): in every decoder layer the q/k/v and MLP up/gate projections are split
  by output features (attention by whole heads, so each rank attends over its own query and KV
  heads), the attention output and MLP down projections by input features, and their partial
  outputs are summed with ``dist.all_reduce`` (bias added once, after the sum). Embeddings, norms
  and the output projection are replicated; only rank 0 computes the logits.

Every rank keeps its own KV caches (by id); the coordinator's ``RemoteCache`` is a handle whose
``crop`` and release travel with the next request. Communication is timed inside the ranks:
``comm_seconds`` is the time spent in send / recv / all_reduce (which includes waiting for the
peer: in a one-sequence pipeline the next stage waits for the previous one to compute, the
pipeline bubble), ``comm_bytes`` the payload bytes sent (for all-reduce the tensor each rank
contributes; gloo's ring moves about 2(N-1)/N of it each way), ``recv_bytes`` those received by
``recv``; ``compute_seconds`` is the rest of the forward pass.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

from slimbench.engines.workers import WorkerGroup, free_loopback_port, pack, unpack


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


@dataclass
class RankState:
    """One rank's part of the model, its KV caches, and how it joins a forward pass."""

    model: nn.Module
    rank: int
    world: int
    mode: str
    layout: Layout
    device: torch.device
    caches: dict[int, Any] = field(default_factory=dict)
    injected: Injected | None = None

    @property
    def returns_logits(self) -> bool:
        return self.rank == (self.world - 1 if self.mode == "pipeline" else 0)

    def info(self) -> dict[str, Any]:
        from slimbench.modeling import count_parameters, memory_bytes

        return {
            "pid": os.getpid(),
            "parameters": count_parameters(self.model),
            "memory_bytes": memory_bytes(self.model),
            "layers": len(get(self.model, self.layout.layers)),
        }

    def handle(self, req: dict[str, Any]) -> Any:
        for cid in req.get("free", ()):
            self.caches.pop(cid, None)
        op = req["op"]
        if op == "forward":
            return self.forward(req)
        if op == "stats":
            return {**COUNTERS.__dict__, "rss_bytes": psutil.Process().memory_info().rss, "caches": len(self.caches)}
        if op == "reset_stats":
            COUNTERS.__init__()
            return None
        if op == "raise":  # for tests: an error inside a worker
            raise RuntimeError(f"requested failure on rank {self.rank}")
        raise ValueError(f"unknown request {op!r}")

    @torch.inference_mode()
    def forward(self, req: dict[str, Any]) -> Any:
        import torch.distributed as dist

        t0 = time.perf_counter()
        ids = unpack(req["ids"]).to(self.device)
        cache = None
        if req["cache"] is not None:
            cache = self.caches[req["cache"]]
            keep = req.get("crop")
            if keep is not None and cache.get_seq_length() > keep:
                cache.crop(keep - cache.get_seq_length())
        if self.mode == "pipeline" and self.rank > 0:
            hidden = torch.empty(*ids.shape, self.model.config.hidden_size, dtype=self.model.dtype, device=self.device)
            timed_comm(dist.recv, hidden, src=self.rank - 1, received=True)
            self.injected.value = hidden
        runner = self.model if self.returns_logits else self.model.base_model
        out = runner(input_ids=ids, cache=cache, use_cache=req["use_cache"])
        if self.injected is not None:
            self.injected.value = None
        if self.mode == "pipeline" and self.rank < self.world - 1:
            timed_comm(dist.send, out.last_hidden_state.contiguous(), dst=self.rank + 1)
        if req["use_cache"]:
            self.caches[req["new_cache"] if req["cache"] is None else req["cache"]] = out.cache
        COUNTERS.forward_calls += 1
        COUNTERS.forward_seconds += time.perf_counter() - t0
        return pack(out.logits) if self.returns_logits else None


def prepare_pipeline(model: nn.Module, rank: int, world: int, layout: Layout, bounds) -> Injected | None:
    from slimbench.methods.distillation.student import drop_layers

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


def setup_rank(rank: int, payload: dict[str, Any]) -> RankState:
    """Join the process group and keep this rank's part of the model (runs in the worker)."""
    import torch.distributed as dist

    torch.set_num_threads(payload["threads"])
    device = torch.device(f"cuda:{rank}" if payload["backend"] == "nccl" else "cpu")
    dist.init_process_group(
        payload["backend"],
        init_method=f"tcp://127.0.0.1:{payload['port']}",
        rank=rank,
        world_size=payload["world"],
        timeout=datetime.timedelta(seconds=payload["timeout_s"]),
    )
    model = payload["model"]
    layout = layout_for(model, payload["mode"])
    injected = None
    if payload["mode"] == "pipeline":
        injected = prepare_pipeline(model, rank, payload["world"], layout, payload["bounds"])
    else:
        prepare_tensor(model, rank, payload["world"], layout)
    model.to(device).eval()
    return RankState(model, rank, payload["world"], payload["mode"], layout, device, injected=injected)


# -- the coordinator side ----------------------------------------------------------------------
class RemoteCache:
    """Handle of the KV caches the ranks hold under one id (transformers' crop convention)."""

    def __init__(self, owner: DistributedModel, cid: int, length: int):
        self.owner, self.cid, self.length = owner, cid, length
        self.crop_to: int | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, tokens: int) -> None:
        """``crop(-n)`` drops the last n tokens (applied by the ranks with the next request)."""
        self.length = self.length + tokens if tokens < 0 else min(self.length, tokens)
        self.crop_to = self.length

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.owner.released.append(self.cid)


@dataclass
class Output:
    logits: torch.Tensor
    cache: RemoteCache | None = None


class DistributedModel(nn.Module):
    """The call contract of ``slimbench.lm`` over a ``WorkerGroup`` (see the module docstring)."""

    def __init__(self, group: WorkerGroup, config, mode: str, world: int, dtype: torch.dtype):
        super().__init__()
        self.group, self.config, self.mode, self.world = group, config, mode, world
        self._dtype = dtype
        self.released: list[int] = []
        self._next_cache = 0
        self.host_seconds = 0.0  # coordinator wall time of forward requests
        self.pipe_bytes = 0  # request + reply payload bytes through the pipes
        self.size_base: dict[str, Any] = {}  # the single-process model's sizes (set by the method)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, input_ids: torch.Tensor, cache: RemoteCache | None = None, use_cache: bool = False, **kwargs):
        unsupported = {k for k, v in kwargs.items() if v is not None and k not in ("return_dict",)}
        if unsupported:
            raise TypeError(
                f"a {self.mode}-parallel model takes input_ids, cache and use_cache only, not {sorted(unsupported)}"
            )
        if cache is not None and not isinstance(cache, RemoteCache):
            raise TypeError(
                f"a {self.mode}-parallel model keeps its KV caches in the workers; got a {type(cache).__name__}"
            )
        req: dict[str, Any] = {
            "op": "forward",
            "ids": pack(input_ids),
            "use_cache": bool(use_cache or cache is not None),
        }
        req["cache"] = cache.cid if cache is not None else None
        req["crop"] = cache.crop_to if cache is not None else None
        if cache is None and req["use_cache"]:
            self._next_cache += 1
            req["new_cache"] = self._next_cache
        req["free"], self.released = self.released, []
        t0 = time.perf_counter()
        replies = self.group.request(req, what="a forward pass")
        self.host_seconds += time.perf_counter() - t0
        packed = next(r for r in replies if r is not None)
        self.pipe_bytes += len(req["ids"][2]) + len(packed[2])
        logits = unpack(packed)
        if not req["use_cache"]:
            return Output(logits)
        if cache is None:
            cache = RemoteCache(self, req["new_cache"], 0)
        cache.crop_to = None
        cache.length += input_ids.shape[1]
        return Output(logits, cache)

    def stats(self) -> dict[str, Any]:
        ranks = self.group.request({"op": "stats"}, what="stats")
        for r in ranks:
            r["compute_seconds"] = r["forward_seconds"] - r["comm_seconds"]
        busy = sum(r["forward_seconds"] for r in ranks)
        comm = sum(r["comm_seconds"] for r in ranks)
        return {
            "ranks": ranks,
            "host_seconds": self.host_seconds,
            "pipe_bytes": self.pipe_bytes,
            "comm_seconds": comm,
            "comm_bytes": sum(r["comm_bytes"] for r in ranks),
            "compute_seconds": busy - comm,
            "comm_share": comm / busy if busy else None,
            # coordinator time not spent inside any rank's forward: pipes, pickling, scheduling
            "host_overhead_seconds": max(0.0, self.host_seconds - max(r["forward_seconds"] for r in ranks)),
        }

    def reset_stats(self) -> None:
        self.group.request({"op": "reset_stats"}, what="stats")
        self.host_seconds, self.pipe_bytes = 0.0, 0

    def close(self) -> None:
        self.group.close()

    def slimbench_size(self) -> dict[str, Any]:
        """Sizes for the harness' method report: the single model's, memory summed over the ranks."""
        infos = self.group.infos
        return {
            "parameters": sum(i["parameters"] for i in infos),  # replicated parts counted per rank
            **self.size_base,
            "memory_bytes": sum(i["memory_bytes"] for i in infos),
        }


def launch(
    model: nn.Module, mode: str, world: int, *, threads: int, timeout_s: float, split=None, device: str = "cpu"
) -> DistributedModel:
    """Start ``world`` ranks holding ``model`` split by ``mode``; returns the coordinator's module."""
    check_split(model, mode, world, split)
    backend = "nccl" if device == "cuda" else "gloo"
    depth = len(get(model, layout_for(model, mode).layers))
    payload = {
        "model": model.cpu(),
        "mode": mode,
        "world": world,
        "port": free_loopback_port(),
        "backend": backend,
        "threads": threads,
        "timeout_s": timeout_s,
        "bounds": stage_bounds(depth, world, split),
    }
    # Loopback only: gloo and NCCL pick the interface to bind from these.
    env = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    group = WorkerGroup(setup_rank, [payload] * world, name=f"{mode}-parallel", timeout_s=timeout_s, env=env)
    return DistributedModel(group, model.config, mode, world, next(model.parameters()).dtype)
