"""`benchmark.py speed`: the perplexity task's throughput against a bare forward loop.

Both evaluate the same windows on the same loaded model, alternating round by round so
drift in machine load affects both alike; the ratio of the medians is what matters.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from slimbench.registry import CORPORA, TASKS
from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.task import TaskContext


def bare_loop(model: torch.nn.Module, win: torch.Tensor) -> float:
    """The simplest correct loop: forward, cross-entropy, nothing else. Returns tokens/s."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in win.split(1):
            logits = model(input_ids=w).logits[:, :-1]
            F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    return win.numel() / (time.perf_counter() - t0)


def perplexity_overhead(model: str = "smollm2-135m", windows: int = 8, seqlen: int = 512, rounds: int = 3) -> dict:
    from slimbench.zoo.models import resolve

    hw = HardwareSpec(threads=2)
    spec = ModelSpec(name=model)
    lm = resolve(spec, source="speed", field="model")(spec, hw)
    torch.set_num_threads(hw.threads)
    task = TASKS.get("perplexity")
    cfg = task.config(seqlen=seqlen, max_windows=windows)
    from slimbench.tasks.perplexity import JOIN
    from slimbench.tasks.perplexity import windows as make_windows

    win = make_windows(lm.encode(JOIN.join(CORPORA.get(cfg.corpus).texts(cfg.split))), seqlen, windows)
    bare_loop(lm.model, win[:1])  # warm-up
    bare, harness = [], []
    for r in range(rounds):
        bare.append(bare_loop(lm.model, win))
        res = task.evaluate(lm, cfg, TaskContext(hardware=hw))
        harness.append(res.metrics["eval_tokens_per_s"].value)
        print(f"round {r + 1}/{rounds}: bare {bare[-1]:.0f} tok/s, harness {harness[-1]:.0f} tok/s")
    out = {
        "model": model,
        "windows": windows,
        "seqlen": seqlen,
        "threads": hw.threads,
        "bare_tokens_per_s": statistics.median(bare),
        "harness_tokens_per_s": statistics.median(harness),
    }
    out["ratio"] = out["harness_tokens_per_s"] / out["bare_tokens_per_s"]
    print(
        f"perplexity task keeps {out['ratio']:.1%} of the bare loop's throughput "
        f"(median of {rounds} alternating rounds, {windows} windows x {seqlen} tokens, {model}, {hw.threads} threads)"
    )
    return out
