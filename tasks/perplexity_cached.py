"""`perplexity-cached`: long-context perplexity computed *through the model's KV cache*.

The ``perplexity`` task scores each window in one forward pass without a cache, so a lossy KV
cache (quantized, sliding window) would change nothing there. Here every window is fed in
chunks of ``chunk`` positions, each chunk one forward call on the cache the model generates with
(``lm.cache_factory``; transformers' dynamic cache when none is set). Position ``t`` in a chunk
sees the positions of earlier chunks as the cache holds them (dequantized, evicted) and the
positions of its own chunk exactly, which is what decoding does with ``chunk = 1``.

Windows: the ``perplexity`` task's concat-windows (the split joined with ``"\\n\\n"``, tokenized
once, cut into ``seqlen``-token windows, ``max_windows`` evenly spaced). Perplexity = exp(mean
over windows of each window's mean NLL of tokens 1..seqlen-1).

``reference`` (``auto``: when the cache is lossy): the same chunks also run on a plain dynamic
cache in lockstep, and the next-token distributions are compared: ``kl_to_exact_cache`` (nats,
KL(exact || cached), mean over positions) and ``top1_agreement_exact_cache``: the cost of the
cache alone, whatever the weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from slimbench.tasks.perplexity import JOIN, windows

from slimbench.config import Config
from slimbench.registry import CORPORA
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.corpora import encode_split

PROTOCOL = "concat-windows-cached"


class PerplexityCachedConfig(Config):
    corpus: str = Field("shakespeare", description="registered corpus")
    split: str = Field("test", description="corpus split")
    seqlen: int = Field(2048, ge=8, le=131072, description="tokens per window (SmolLM2 takes up to 8192)")
    max_windows: int | None = Field(4, ge=1, description="evenly spaced subset of windows; null = all")
    chunk: int = Field(64, ge=1, le=131072, description="positions per forward call through the cache")
    batch_size: int = Field(1, ge=1, le=64, description="windows per forward call")
    reference: Literal["auto", "on", "off"] = Field(
        "auto", description="also run an exact dynamic cache and report KL / top-1 to it (auto: lossy caches)"
    )


def new_cache(lm, batch: int, capacity: int, factory: Any = "model") -> Any:
    """A fresh cache: ``lm.cache_factory``'s (``factory="model"``), or a plain dynamic one (None)."""
    from transformers.cache_utils import DynamicCache

    factory = lm.cache_factory if factory == "model" else factory
    return factory(lm, batch, capacity) if factory is not None else DynamicCache(config=lm.model.config)


@torch.inference_mode()
def chunked_logits(lm, ids: torch.Tensor, chunk: int, factory: Any = "model") -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 logits ``[B, c, V]``) for consecutive chunks of ``ids``, through one cache."""
    ids = ids.to(lm.device)
    cache = new_cache(lm, ids.shape[0], ids.shape[1], factory)
    for start in range(0, ids.shape[1], chunk):
        out = lm.model(input_ids=ids[:, start : start + chunk], cache=cache, use_cache=True)
        cache = out.cache
        yield start, out.logits.float()


def logits_through_cache(lm, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Float32 logits ``[B, T, V]`` of every position, computed through the model's cache in chunks."""
    return torch.cat([lg for _, lg in chunked_logits(lm, ids, chunk)], dim=1)


def score_window(lm, batch: torch.Tensor, cfg: PerplexityCachedConfig, reference: bool) -> dict[str, torch.Tensor]:
    """Per-row summed NLL over tokens 1..T-1, and (with ``reference``) summed KL / top-1 matches."""
    b, t = batch.shape
    nll = torch.zeros(b, dtype=torch.float64)
    kl = torch.zeros(b, dtype=torch.float64)
    top1 = torch.zeros(b, dtype=torch.float64)
    ref_iter = chunked_logits(lm, batch, cfg.chunk, factory=None) if reference else None
    target = batch.to(lm.device)
    for start, logits in chunked_logits(lm, batch, cfg.chunk):
        c = logits.shape[1]
        logp = F.log_softmax(logits, dim=-1)
        n = min(c, t - 1 - start)  # the window's last position predicts nothing
        if n > 0:
            tgt = target[:, start + 1 : start + 1 + n]
            nll += -logp[:, :n].gather(-1, tgt[..., None]).squeeze(-1).double().sum(1).cpu()
        if ref_iter is not None:
            _, ref_logits = next(ref_iter)
            ref_logp = F.log_softmax(ref_logits, dim=-1)
            kl += (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).double().sum(1).cpu()
            top1 += (ref_logp.argmax(-1) == logp.argmax(-1)).double().sum(1).cpu()
    return {"nll": nll, "kl": kl, "top1": top1}


def evaluate(lm, cfg: PerplexityCachedConfig, ctx) -> TaskResult:
    corpus = CORPORA.get(cfg.corpus)
    ids = encode_split(lm, cfg.corpus, cfg.split, JOIN)
    win = windows(ids, cfg.seqlen, cfg.max_windows)
    lossy = bool(getattr(lm.cache_factory, "lossy", False))
    reference = cfg.reference == "on" or (cfg.reference == "auto" and lossy)
    window_nll, window_kl, window_top1 = [], [], []
    bar = ctx.progress(total=len(win), desc="perplexity-cached", unit="win") if ctx.progress else None
    t0 = time.perf_counter()
    for batch in win.split(cfg.batch_size):
        s = score_window(lm, batch, cfg, reference)
        window_nll += (s["nll"] / (cfg.seqlen - 1)).tolist()
        window_kl += (s["kl"] / cfg.seqlen).tolist()
        window_top1 += (s["top1"] / cfg.seqlen).tolist()
        if bar is not None:
            bar.update(len(batch))
    lm.synchronize()
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    mean_nll = sum(window_nll) / len(window_nll)
    metrics = {
        "perplexity": Metric(math.exp(mean_nll), "ppl", higher_is_better=False),
        "nll": Metric(mean_nll, "nats/token", higher_is_better=False),
        "eval_tokens_per_s": Metric(win.numel() * (2 if reference else 1) / seconds, "tokens/s", True),
    }
    per_example: dict[str, Any] = {"id": [str(i) for i in range(len(window_nll))], "nll": window_nll}
    if reference:
        metrics["kl_to_exact_cache"] = Metric(sum(window_kl) / len(window_kl), "nats/token", False)
        metrics["top1_agreement_exact_cache"] = Metric(sum(window_top1) / len(window_top1), "fraction", True)
        per_example.update(kl=window_kl, top1=window_top1)
    return TaskResult(
        metrics=metrics,
        details={
            "protocol": PROTOCOL,
            "join": JOIN,
            "cache": repr(lm.cache_factory) if lm.cache_factory is not None else "transformers DynamicCache (default)",
            "cache_lossy": lossy,
            "chunk": cfg.chunk,
            "reference": reference,
            "split_tokens": len(ids),
            "windows_available": len(ids) // cfg.seqlen,
            "windows": len(win),
            "tokens": win.numel(),
            "per_example": per_example,
            "data": corpus.manifest(cfg.split),
        },
    )


TASK = Task(
    name="perplexity-cached",
    version=f"{PROTOCOL}/1",
    description="long-context perplexity scored through the model's KV cache in chunks (lossy caches count), "
    "with KL / top-1 to an exact cache",
    config=PerplexityCachedConfig,
    evaluate=evaluate,
    quality_metric="perplexity",
    paired_metric="nll",
)
