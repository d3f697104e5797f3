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

from slimbench.engines.sharding import (
    COUNTERS,
    Injected,
    Layout,
    check_split,
    get,
    layout_for,
    prepare_pipeline,
    prepare_tensor,
    stage_bounds,
    timed_comm,
)
from slimbench.engines.workers import WorkerGroup, free_loopback_port, pack, unpack


# -- inside a worker ---------------------------------------------------------------------------
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
    # the fork server imports transformers' model machinery and this architecture's once
    preload = ("slimbench.engines.parallel", "transformers.modeling_utils", type(model).__module__)
    group = WorkerGroup(setup_rank, [payload] * world, name=f"{mode}-parallel", timeout_s=timeout_s, env=env,
                        preload=preload)
    return DistributedModel(group, model.config, mode, world, next(model.parameters()).dtype)
