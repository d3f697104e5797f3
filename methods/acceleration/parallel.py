"""`parallel`: the model split across worker processes, pipeline or tensor parallel.

``mode: pipeline`` gives each of ``world_size`` processes a contiguous slice of the decoder
layers and passes the hidden states between them; ``mode: tensor`` shards every decoder layer's
linear layers across them (attention by whole heads) and sums partial results with all-reduce
(slimbench.engines.parallel). ``lm.model`` becomes a module that drives the workers, so every
task runs through it unchanged.

At apply time the method compares the split model with the single-process one on a corpus
prompt (logits of every position, and greedy decoding with the KV cache), fails the cell if the
logits differ beyond ``tolerance`` (relative to the largest logit), and times one prefill and
decode run to report communication time and bytes apart from compute. A worker that raises, dies
or hangs past ``timeout_s`` fails the cell with the worker's error; the workers are shut down
when the model is released (end of the cell group) or the process exits.

On a 2-core CPU two processes show the mechanics and the overhead, not a speed-up: each worker
gets ``threads_per_worker`` threads (default: the cell's threads split between them).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from slimbench.config import Config
from slimbench.engines.parallel import DistributedModel, launch
from slimbench.engines.sharding import check_split, head_counts, stage_bounds
from slimbench.method import Method, MethodReport


class ParallelConfig(Config):
    mode: Literal["pipeline", "tensor"] = Field(
        "pipeline", description="split decoder layers (pipeline) or weights (tensor)"
    )
    world_size: int = Field(2, ge=2, le=64, description="worker processes")
    layers_per_stage: list[int] | None = Field(
        None, description="pipeline: decoder layers of each process (default: even)"
    )
    threads_per_worker: int | None = Field(
        None, ge=1, le=512, description="torch threads per worker (default: cell threads / world_size, at least 1)"
    )
    timeout_s: float = Field(600.0, gt=0, description="longest wait for a worker's reply before the cell fails")
    tolerance: float | None = Field(
        None,
        gt=0,
        description="max |logit difference| / max |logit| allowed vs one process (default 1e-4 fp32, 3e-2 half)",
    )
    check_prompt_len: int = Field(64, ge=1, le=8192, description="self-check prompt tokens (corpus text)")
    check_new_tokens: int = Field(16, ge=1, le=4096, description="self-check greedy tokens")
    corpus: str = Field("shakespeare", description="where the self-check prompt comes from")
    split: str = Field("test", description="corpus split of the self-check prompt")

    @model_validator(mode="after")
    def _stages(self):
        if self.layers_per_stage is not None:
            if self.mode != "pipeline":
                raise ValueError("layers_per_stage applies to mode: pipeline only")
            if len(self.layers_per_stage) != self.world_size:
                raise ValueError(
                    f"layers_per_stage has {len(self.layers_per_stage)} entries for world_size {self.world_size}"
                )
        return self


def check(lm, cfg: ParallelConfig) -> None:
    from transformers import PreTrainedModel

    if not isinstance(lm.model, PreTrainedModel):
        raise ValueError(
            f"parallel: needs a transformers model to split; the model is a {type(lm.model).__name__} "
            "(from an earlier execution step): put parallel before it"
        )
    if lm.cache_factory is not None:
        raise ValueError("parallel: each worker keeps its own dynamic KV cache; it cannot follow a kv-cache step")
    if lm.device.type == "cuda" and torch.cuda.device_count() < cfg.world_size:
        raise ValueError(
            f"parallel: NCCL needs one GPU per process: {cfg.world_size} processes, "
            f"{torch.cuda.device_count()} GPU(s) visible"
        )
    check_split(lm.model, cfg.mode, cfg.world_size, cfg.layers_per_stage)


def check_prompt(lm, cfg: ParallelConfig) -> torch.Tensor:
    from slimbench.zoo.corpora import encode_split

    ids = encode_split(lm, cfg.corpus, cfg.split)[: cfg.check_prompt_len]
    if len(ids) < cfg.check_prompt_len:
        raise ValueError(f"parallel: corpus split gives only {len(ids)} prompt tokens (< {cfg.check_prompt_len})")
    return torch.tensor([ids])


def compare(lm, dm: DistributedModel, ids: torch.Tensor, ref_logits, ref_tokens, cfg: ParallelConfig) -> dict:
    logits = lm.logits(ids).float()
    diff = float((logits - ref_logits).abs().max())
    scale = float(ref_logits.abs().max())
    half = dm.dtype != torch.float32
    tol = cfg.tolerance or (3e-2 if half else 1e-4)
    if diff > tol * max(1.0, scale):
        raise ValueError(
            f"parallel: {cfg.mode}-parallel logits differ from the single process by {diff:.3g} "
            f"(max |logit| {scale:.3g}; tolerance {tol:g} relative)"
        )
    dm.reset_stats()
    lm.synchronize()
    t0 = time.perf_counter()
    tokens = lm.generate(ids, cfg.check_new_tokens)
    wall = time.perf_counter() - t0
    return {
        "logits_max_abs_diff": diff,
        "logits_max_abs": scale,
        "tolerance_relative": tol,
        "greedy_identical": bool(torch.equal(tokens, ref_tokens)),
        "generate_seconds": wall,
        **dm.stats(),
    }


def apply(lm, cfg: ParallelConfig, ctx) -> MethodReport:
    from slimbench.method import size_report
    from slimbench.modeling import count_parameters

    model = lm.model
    ids = check_prompt(lm, cfg)
    ref_logits = lm.logits(ids).float()
    ref_tokens = lm.generate(ids, cfg.check_new_tokens)
    single = size_report(model, {})
    threads = cfg.threads_per_worker or max(1, torch.get_num_threads() // cfg.world_size)  # the cell's resolved count
    t0 = time.perf_counter()
    dm = launch(
        model,
        cfg.mode,
        cfg.world_size,
        threads=threads,
        timeout_s=cfg.timeout_s,
        split=cfg.layers_per_stage,
        device=lm.device.type,
    )
    launch_s = time.perf_counter() - t0
    lm.model = dm
    single["parameters"] = count_parameters(model)
    del model  # the workers hold the weights now
    dm.size_base = {k: v for k, v in single.items() if k != "memory_bytes"}
    ranks = {"per_rank": dm.group.infos}
    try:
        result = compare(lm, dm, ids, ref_logits, ref_tokens, cfg)
    except Exception:
        dm.close()
        raise
    q, kv = head_counts(dm.config)
    depth = sum(i["layers"] for i in ranks["per_rank"]) if cfg.mode == "pipeline" else ranks["per_rank"][0]["layers"]
    details = {
        "mode": cfg.mode,
        "world_size": cfg.world_size,
        "backend": "nccl" if lm.device.type == "cuda" else "gloo",
        "threads_per_worker": threads,
        "launch_seconds": launch_s,
        "per_rank": ranks["per_rank"],
        "self_check": result,
    }
    if cfg.mode == "pipeline":
        details["stages"] = stage_bounds(depth, cfg.world_size, cfg.layers_per_stage)
    else:
        details["heads_per_rank"] = {"query": q // cfg.world_size, "key_value": kv // cfg.world_size}
    return MethodReport(
        execution="native",
        details=details,
        notes=[
            f"logits equal the single process within {result['logits_max_abs_diff']:.2g} "
            f"(max |logit| {result['logits_max_abs']:.3g})",
            f"communication {100 * (result['comm_share'] or 0):.0f}% of the ranks' forward time in the self-check "
            "(send/recv/all-reduce, including waiting for the peer)",
            "memory_bytes is the sum over worker processes (replicated parts counted per process); "
            "the cell's own peak RSS does not include the workers",
        ],
    )


METHOD = Method(
    name="parallel",
    family="acceleration",
    description=(
        "pipeline (layers) or tensor (sharded linears, all-reduce) parallelism over worker processes; "
        "gloo on CPU, NCCL on CUDA"
    ),
    config=ParallelConfig,
    apply=apply,
    check=check,
    test_params={"check_prompt_len": 16, "check_new_tokens": 4},  # the self-check still compares both
)
