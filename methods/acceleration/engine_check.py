"""Quality through an engine: the same perplexity windows scored in process and by the engine.

Every engine step scores ``windows`` windows of the ``perplexity`` task's protocol (concat-windows:
the split joined with "\\n\\n", non-overlapping windows of ``seqlen`` tokens, ``windows`` of them
evenly spaced) twice: with SlimBench's in-memory model before the engine takes over, and with the
engine's own logits. The record keeps both per-window NLLs and their difference, so every engine
cell shows that the deployed model is the benchmarked one (and by how much it is not). With the
perplexity task at the same ``seqlen`` and ``max_windows``, these are the task's own windows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from slimbench.config import Config


class AgreementConfig(Config):
    check_windows: int = Field(4, ge=1, le=1024, description="perplexity windows scored in process and by the engine")
    check_seqlen: int = Field(512, ge=8, le=131072, description="tokens per window (the perplexity task's seqlen)")
    corpus: str = Field("shakespeare", description="corpus of the agreement windows")
    split: str = Field("test", description="split of the agreement windows")


def refuse_unless_engine_can_take(lm, step: str, engine: str, unavailable: str | None) -> None:
    """What every engine step checks first: the engine is installed, the model is not already in an
    engine, and no kv-cache or speculative step came before (the engine keeps its own cache and loop)."""
    if unavailable:
        raise ValueError(f"{step}: {unavailable}")
    if getattr(lm.model, "engine", None):
        raise ValueError(f"{step}: the model already runs in {lm.model.engine}")
    if lm.cache_factory is not None or lm.generator is not None:
        raise ValueError(f"{step}: {engine} keeps its own KV cache and decoding loop; it cannot follow a kv-cache "
                         "or speculative step")


def switch_to_engine(lm, model, generator, ref_nll: list[float], win: torch.Tensor, cfg: AgreementConfig) -> dict:
    """Score the agreement windows in the engine, then make it the model every task runs through
    (the engine is closed if scoring fails)."""
    try:
        agree = agreement(ref_nll, model.window_nll(win), cfg)
    except BaseException:
        model.close()
        raise
    lm.model = model
    lm.generator = generator
    return agree


def agreement_windows(lm, cfg: AgreementConfig) -> torch.Tensor:
    from slimbench.tasks.perplexity import JOIN, windows

    from slimbench.zoo.corpora import encode_split

    return windows(encode_split(lm, cfg.corpus, cfg.split, JOIN), cfg.check_seqlen, cfg.check_windows)


def in_process_nll(lm, win: torch.Tensor) -> list[float]:
    return [float(lm.token_nll(w[None]).double().mean()) for w in win]


def agreement(ref: list[float], engine: list[float], cfg: AgreementConfig) -> dict[str, Any]:
    ref_mean, eng_mean = sum(ref) / len(ref), sum(engine) / len(engine)
    return {
        "protocol": "concat-windows", "corpus": cfg.corpus, "split": cfg.split, "seqlen": cfg.check_seqlen,
        "windows": len(ref),
        "nll_in_process": ref, "nll_engine": engine,
        "perplexity_in_process": math.exp(ref_mean), "perplexity_engine": math.exp(eng_mean),
        "delta_nll": eng_mean - ref_mean,
        "max_abs_window_delta_nll": max(abs(a - b) for a, b in zip(ref, engine, strict=True)),
    }


def agreement_note(a: dict[str, Any]) -> str:
    return (f"perplexity on {a['windows']} x {a['seqlen']}-token {a['split']} windows: engine "
            f"{a['perplexity_engine']:.4g} vs in process {a['perplexity_in_process']:.4g} "
            f"(delta NLL {a['delta_nll']:+.2e} nats/token)")
