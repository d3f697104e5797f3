"""`perplexity`, protocol ``concat-windows`` (the GPTQ / SparseGPT / Wanda / AWQ protocol).

1. Join the split's documents with ``"\\n\\n"`` and tokenize the result once (no special tokens).
2. Cut the ids into non-overlapping windows of ``seqlen`` tokens; drop the remainder
   (``n = len(ids) // seqlen``).
3. If ``max_windows`` is smaller than ``n``, keep ``max_windows`` windows evenly spaced over
   the split (window ``i * n // max_windows`` for ``i = 0..max_windows-1``), so a budgeted run
   still covers every document rather than only the first.
4. Perplexity = exp(mean over windows of each window's mean next-token NLL). Every window has
   ``seqlen - 1`` predicted tokens, so this equals exp of the mean over all predicted tokens.

Not the same quantity as lm-evaluation-harness' ``wikitext`` word perplexity.
"""

from __future__ import annotations

import math
import time

import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.registry import CORPORA
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.corpora import encode_split

PROTOCOL = "concat-windows"
JOIN = "\n\n"


class PerplexityConfig(Config):
    corpus: str = Field("shakespeare", description="registered corpus")
    split: str = Field("test", description="corpus split: calibration | validation | test")
    seqlen: int = Field(512, ge=8, le=131072, description="tokens per window")
    max_windows: int | None = Field(None, ge=1, description="evenly spaced subset of windows; null = all")
    batch_size: int = Field(1, ge=1, le=256, description="windows per forward pass")


def windows(ids: list[int], seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The protocol's windows as a [k, seqlen] tensor."""
    n = len(ids) // seqlen
    if n == 0:
        raise ValueError(f"the split has {len(ids)} tokens, fewer than one window of {seqlen}")
    t = torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)
    if max_windows is not None and max_windows < n:
        t = t[[i * n // max_windows for i in range(max_windows)]]
    return t


def evaluate(lm, cfg: PerplexityConfig, ctx) -> TaskResult:
    corpus = CORPORA.get(cfg.corpus)
    ids = encode_split(lm, cfg.corpus, cfg.split, JOIN)
    win = windows(ids, cfg.seqlen, cfg.max_windows)
    window_nll: list[float] = []
    bar = ctx.progress(total=len(win), desc="perplexity", unit="win") if ctx.progress else None
    t0 = time.perf_counter()
    for batch in win.split(cfg.batch_size):
        window_nll += lm.token_nll(batch).double().mean(dim=1).tolist()
        if bar is not None:
            bar.update(len(batch))
    lm.synchronize()
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    mean_nll = sum(window_nll) / len(window_nll)
    tokens = win.numel()
    return TaskResult(
        metrics={
            "perplexity": Metric(math.exp(mean_nll), "ppl", higher_is_better=False),
            "nll": Metric(mean_nll, "nats/token", higher_is_better=False),
            "eval_tokens_per_s": Metric(tokens / seconds, "tokens/s", higher_is_better=True),
        },
        details={
            "protocol": PROTOCOL,
            "join": JOIN,
            "split_tokens": len(ids),
            "windows_available": len(ids) // cfg.seqlen,
            "windows": len(win),
            "tokens": tokens,
            "window_nll": window_nll,
            # per-window scores for paired comparisons (same windows, another model)
            "per_example": {"id": [str(i) for i in range(len(window_nll))], "nll": window_nll},
            "data": corpus.manifest(cfg.split),
        },
    )


TASK = Task(
    name="perplexity",
    version=f"{PROTOCOL}/1",
    description="perplexity over non-overlapping windows of the joined split (GPTQ/SparseGPT protocol)",
    config=PerplexityConfig,
    evaluate=evaluate,
    quality_metric="perplexity",
    paired_metric="nll",
)
