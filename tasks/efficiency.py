"""`efficiency`: size, latency and peak memory of inference, measured like a benchmark.

- Size: parameters, bytes in memory, bytes of the stored compressed model and effective bits
  per weight, copied from the harness' report on the method.
- Prefill: milliseconds for one forward pass over a ``prompt_len``-token prompt (real text,
  the first tokens of the corpus split) at ``batch_size``.
- Decode: tokens/s generating ``new_tokens`` greedily with the KV cache after that prefill.
- Each measurement: ``warmup`` untimed runs, then ``repeats`` timed runs, the device
  synchronised before every clock read; the median is the value, the raw samples are kept.
- Peak memory during one more (untimed) prefill + decode: process RSS on CPU, sampled by a
  thread (kept out of the timed runs, where it would steal cycles), max allocated on CUDA.
- Decode bandwidth: model bytes in memory x decode tokens/s, the memory traffic a
  weight-bound decoder needs, to compare with the machine's memory bandwidth.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.measure import PeakMemory, summarize, timed
from slimbench.registry import CORPORA
from slimbench.task import Metric, Task, TaskResult


class EfficiencyConfig(Config):
    prompt_len: int = Field(128, ge=1, le=32768, description="prompt tokens for prefill")
    new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated for decode")
    batch_size: int = Field(1, ge=1, le=512, description="sequences per batch")
    repeats: int = Field(5, ge=1, le=1000, description="timed repetitions")
    warmup: int = Field(1, ge=0, le=100, description="untimed warm-up repetitions")
    corpus: str = Field("shakespeare", description="where the prompt text comes from")
    split: str = Field("test", description="corpus split for the prompt")


def prompt_ids(lm, cfg: EfficiencyConfig) -> torch.Tensor:
    text = "\n\n".join(CORPORA.get(cfg.corpus).texts(cfg.split))
    ids = lm.encode(text[: cfg.prompt_len * 20])[: cfg.prompt_len]
    if len(ids) < cfg.prompt_len:
        raise ValueError(f"corpus split gives only {len(ids)} prompt tokens (< {cfg.prompt_len})")
    return torch.tensor([ids] * cfg.batch_size)


def decode_seconds(lm, ids: torch.Tensor, n: int) -> float:
    """Seconds for n greedy decode steps after an (untimed) prefill."""
    logits, cache = lm.prefill(ids)
    lm.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        logits, cache = lm.decode(logits.argmax(-1, keepdim=True), cache)
    lm.synchronize()
    return time.perf_counter() - t0


def evaluate(lm, cfg: EfficiencyConfig, ctx) -> TaskResult:
    ids = prompt_ids(lm, cfg)
    for _ in range(cfg.warmup):
        lm.prefill(ids)
        decode_seconds(lm, ids, min(cfg.new_tokens, 4))
    prefill = [timed(lambda: lm.prefill(ids), lm.synchronize) * 1e3 for _ in range(cfg.repeats)]
    decode = [cfg.new_tokens * cfg.batch_size / decode_seconds(lm, ids, cfg.new_tokens) for _ in range(cfg.repeats)]
    # Memory in a separate, untimed pass: the RSS sampler thread would steal cycles from the clock.
    with PeakMemory(lm.device) as mem:
        decode_seconds(lm, ids, cfg.new_tokens)
    rep = ctx.method_report
    pre, dec = summarize(prefill), summarize(decode)
    metrics = {
        "prefill_ms": Metric(pre["median"], "ms", False, samples=prefill, spread=pre),
        "decode_tokens_per_s": Metric(dec["median"], "tokens/s", True, samples=decode, spread=dec),
        "peak_memory_mb": Metric(mem.peak_bytes / 2**20, "MiB", False),
    }
    if "memory_bytes" in rep:
        metrics["decode_bandwidth_gbs"] = Metric(
            rep["memory_bytes"] * dec["median"] / cfg.batch_size / 1e9, "GB/s", True
        )
    for key, unit in (
        ("parameters", "count"),
        ("memory_bytes", "bytes"),
        ("stored_bytes", "bytes"),
        ("effective_bits", "bits/weight"),
    ):
        if rep.get(key) is not None:
            metrics[key] = Metric(float(rep[key]), unit, False)
    return TaskResult(
        metrics=metrics,
        details={
            "memory_kind": mem.kind,
            "memory_before_mb": mem.start_bytes / 2**20,
            "execution": rep.get("execution"),
        },
    )


TASK = Task(
    name="efficiency",
    version="1",
    description="size, prefill latency, decode tokens/s with KV cache, and peak memory (median of repeats)",
    config=EfficiencyConfig,
    evaluate=evaluate,
)
