"""What the long-context tasks share: examples per length and depth, the run through the cache,
RULER's scoring, and the record (accuracy per length and depth, KV bytes kept).

**Protocol** (each task file names its generator, lengths, depths, samples and seed):

1. Examples from slimbench/zoo/datasets/long_context.py, fitted so that prompt tokens +
   ``max_new_tokens`` <= the length (RULER's rule); context and query are tokenized apart.
2. ``question: in-prompt`` (the default; the protocol of the SnapKV, PyramidKV, H2O and TOVA
   papers): the whole prompt (context, question, answer prefix) is one forward call through the
   model's KV cache (``lm.cache_factory``), which an eviction policy compresses after it, with
   the question in view; then greedy decoding of up to ``max_new_tokens`` tokens, stopped at EOS.
   The first answer token comes from the exact prefill for every policy (eviction runs after
   each layer's attention); the rest read the compressed cache.
   ``question: after-context`` (kvpress's protocol, query-agnostic): the context is one call,
   compressed before the question is seen, then the question is a second call through the same
   cache; policies that compress prompt calls compress again after it, so every policy holds its
   budget when the answer starts.
3. Scores: RULER's ``string_match_all`` (the fraction of references that occur in the
   prediction, case-insensitive, after RULER's ``postprocess_pred``), or, for passkey, exact
   match of the first generated tokens to the key's tokens (LongLoRA's passkey check).
4. The uncompressed model is scored by the same protocol (the ``baseline`` cell); compressed
   cells are read as paired deltas against it (per-example scores with ids).

With ``share_prefill`` an eviction policy's context prefill is recorded once per (model
weights, prompt) and replayed (tasks/_prefill_memo.py): same bits, one prefill for all policies.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from slimbench.tasks._prefill_memo import memo_dir, recorded_cache

from slimbench.config import Config
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.datasets.long_context import GENERATOR_VERSION, Fitted, Parts, fit

CONTROL = re.compile(r"[\x00-\x1f]")


class LongContextConfig(Config):
    lengths: list[int] = Field([1024, 2048, 4096], min_length=1, description="context lengths in tokens (prompt + "
                               "max_new_tokens); at most the model's maximum")
    samples: int = Field(1, ge=1, le=10000, description="examples per length (and depth)")
    seed: int = Field(0, ge=0, description="generator seed")
    max_new_tokens: int = Field(16, ge=1, le=1024, description="greedy tokens generated per answer (stops at EOS; "
                                "RULER: 128 for needles, 30 variable tracking, 120 common words)")
    share_prefill: bool = Field(True, description="record each prompt's exact prefill once per model and replay it "
                                "for every eviction policy (same results, one prefill)")
    question: Literal["in-prompt", "after-context"] = Field(
        "in-prompt", description="in-prompt: the question is part of the compressed prompt (the policies' papers); "
        "after-context: the context is compressed before the question is seen (kvpress, query-agnostic)")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if n < 128 or n > 1048576]
        if bad:
            raise ValueError(f"lengths {bad}: each must be between 128 and 1048576 tokens")
        if len(set(v)) != len(v):
            raise ValueError(f"lengths {v} repeat a length")
        return sorted(v)


class DepthConfig(LongContextConfig):
    depths: list[float] = Field([0, 25, 50, 75, 100], min_length=1, description="needle depths, % of the haystack "
                                "(0: first, 100: last)")

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not 0 <= d <= 100]
        if bad:
            raise ValueError(f"depths {bad}: a needle depth is a percentage from 0 to 100")
        return sorted(v)


@dataclass(frozen=True)
class Spec:
    """One long-context task: its name, how it builds an example, how it scores one."""

    name: str
    build: Callable[[str, int, float | None, int], Parts]  # (seed, units, depth, length) -> Parts
    score: Callable[[str, list[int], Any, Fitted], float]  # (prediction, generated ids, lm, example) -> 0..1
    source: str  # what the protocol follows (cited in the record)
    depths: bool = False


@dataclass
class Example:
    id: str
    length: int
    depth: float | None
    fitted: Fitted


# -- scoring ----------------------------------------------------------------------------------------
def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, then strip."""
    return CONTROL.sub("\n", prediction).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's per-example ``string_match_all``: share of references found (case-insensitive substring)."""
    pred = postprocess(prediction).lower()
    return sum(1.0 if r.lower() in pred else 0.0 for r in references) / len(references)


def ruler_score(prediction: str, generated: list[int], lm: Any, example: Fitted) -> float:
    return string_match_all(prediction, example.parts.answers)


# -- examples ---------------------------------------------------------------------------------------
def model_max_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check(spec: Spec, lm: Any, cfg: LongContextConfig, steps: list[tuple[Any, Any]] = ()) -> None:
    """Refuse what cannot run, before anything loads: lengths over the model's maximum, budgets
    not smaller than the shortest context."""
    top = model_max_length(getattr(lm.model, "config", None))
    if top is not None and max(cfg.lengths) > top:
        raise ValueError(f"{spec.name}: length {max(cfg.lengths)} is longer than {lm.name}'s maximum of {top} tokens")
    shortest = min(cfg.lengths) - cfg.max_new_tokens
    for method, mcfg in steps:
        problem = getattr(mcfg, "context_problem", None)
        why = problem(shortest) if problem else None
        if why:
            raise ValueError(f"{spec.name}: {method.name}: {why} (the shortest length, {min(cfg.lengths)}, minus "
                             f"{cfg.max_new_tokens} answer tokens)")


def examples(lm: Any, spec: Spec, cfg: LongContextConfig) -> list[Example]:
    out = []
    depths = cfg.depths if spec.depths else [None]
    for length in cfg.lengths:
        for depth in depths:
            for i in range(cfg.samples):
                ex_id = f"{spec.name}/L{length}" + (f"/d{depth:g}" if depth is not None else "") + f"/{i}"
                seed = f"{cfg.seed}/{ex_id}"
                fitted = fit(lambda u, s=seed, d=depth, n=length: spec.build(s, u, d, n), lm.encode,
                             length - cfg.max_new_tokens)
                out.append(Example(ex_id, length, depth, fitted))
    return out


# -- running one example through the cache -----------------------------------------------------
def layer_bytes(cache: Any) -> dict[str, float]:
    """KV bytes after a call: the full cache this model would hold, and what this cache holds."""
    full = logical = physical = 0.0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "kv_bytes"):
            b = layer.kv_bytes()
            full += b["logical"]
            logical += b["logical"] * (b["held"] / b["positions"] if b["positions"] else 0)
            physical += b["physical"]
        elif isinstance(getattr(layer, "keys", None), torch.Tensor):  # transformers' own (sliding) layers
            n = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
            full, logical, physical = full + n, logical + n, physical + n
    return {"full": full, "kept_logical": logical, "kept_physical": physical}


def forward(lm: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    kw = {"logits_to_keep": 1} if lm._accepts("logits_to_keep") else {}
    out = lm.model(input_ids=ids.to(lm.device), cache=cache, use_cache=True, **kw)
    return out.logits[:, -1].float(), out.cache


def shareable(lm: Any) -> bool:
    """Whether this model's prefill can be recorded and replayed: an eviction policy's cache, or
    the plain model (no other cache or engine) of a supported architecture on SDPA attention."""
    from slimbench.methods.kvcache.hook import installable
    from slimbench.methods.kvcache.policy import SUPPORTED

    factory = lm.cache_factory
    if factory is not None:
        return hasattr(factory, "from_record")
    config = getattr(lm.model, "config", None)
    return (lm.generator is None and getattr(config, "model_type", None) in SUPPORTED
            and isinstance(lm.model, torch.nn.Module) and hasattr(lm.model, "set_attn_implementation")
            and installable(lm.model) is None)


@torch.inference_mode()
def run_example(lm: Any, ex: Example, cfg: LongContextConfig) -> dict[str, Any]:
    factory = lm.cache_factory
    after = cfg.question == "after-context"
    ids = torch.tensor([ex.fitted.context_ids if after else ex.fitted.context_ids + ex.fitted.query_ids])
    reused = False
    t0 = time.perf_counter()
    if cfg.share_prefill and shareable(lm):
        cache, reused, logits = recorded_cache(lm, factory, ids, memo_dir())
    elif factory is not None and hasattr(factory, "from_record"):
        cache, reused, logits = recorded_cache(lm, factory, ids, None)
    else:
        cache = factory(lm, 1, ex.length) if factory is not None else None
        logits, cache = forward(lm, ids, cache)
    t_context = time.perf_counter() - t0
    if after:
        logits, cache = forward(lm, torch.tensor([ex.fitted.query_ids]), cache)
    at_answer = layer_bytes(cache)
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    generated: list[int] = []
    for i in range(cfg.max_new_tokens):
        nxt = int(logits[0].argmax())
        if nxt == eos:
            break
        generated.append(nxt)
        if i < cfg.max_new_tokens - 1:
            logits, cache = forward(lm, torch.tensor([[nxt]]), cache)
    return {"generated": generated, "bytes": at_answer, "reused": reused, "context_seconds": t_context}


# -- the task ----------------------------------------------------------------------------------------
def evaluate(spec: Spec, lm: Any, cfg: LongContextConfig, ctx: Any) -> TaskResult:
    check(spec, lm, cfg)
    exs = examples(lm, spec, cfg)
    budget = getattr(getattr(getattr(lm.cache_factory, "policy", None), "cfg", None), "budget", None)
    short = min(len(e.fitted.context_ids) for e in exs)
    if budget is not None and budget >= short:
        raise ValueError(f"{spec.name}: the policy's budget of {budget} positions is not smaller than the shortest "
                         f"context ({short} tokens): nothing would be evicted")
    bar = ctx.progress(total=len(exs), desc=spec.name, unit="ex") if ctx.progress else None
    rows: dict[str, list] = {k: [] for k in ("id", "score", "length", "depth", "tokens", "context_tokens", "prediction",
                                             "kept_fraction_logical", "kept_fraction_physical", "kv_bytes_physical")}
    reused = 0
    for ex in exs:
        res = run_example(lm, ex, cfg)
        pred = lm.decode_ids(res["generated"])
        b = res["bytes"]
        rows["id"].append(ex.id)
        rows["score"].append(float(spec.score(pred, res["generated"], lm, ex.fitted)))
        rows["length"].append(ex.length)
        rows["depth"].append(ex.depth)
        rows["tokens"].append(ex.fitted.tokens)
        rows["context_tokens"].append(len(ex.fitted.context_ids))
        rows["prediction"].append(pred)
        rows["kept_fraction_logical"].append(b["kept_logical"] / b["full"] if b["full"] else 1.0)
        rows["kept_fraction_physical"].append(b["kept_physical"] / b["full"] if b["full"] else 1.0)
        rows["kv_bytes_physical"].append(b["kept_physical"])
        reused += res["reused"]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return TaskResult(metrics=metrics(rows, cfg), details=details(spec, cfg, exs, rows, reused))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def metrics(rows: dict[str, list], cfg: LongContextConfig) -> dict[str, Metric]:
    out = {"accuracy": Metric(100 * mean(rows["score"]), "%", True, samples=[100 * s for s in rows["score"]])}
    for length in cfg.lengths:
        sel = [i for i, n in enumerate(rows["length"]) if n == length]
        out[f"accuracy_{length}"] = Metric(100 * mean([rows["score"][i] for i in sel]), "%", True)
    longest = [i for i, n in enumerate(rows["length"]) if n == max(cfg.lengths)]
    for key in ("kept_fraction_logical", "kept_fraction_physical"):
        out[f"kv_{key}"] = Metric(mean([rows[key][i] for i in longest]), "fraction", False)
    out[f"kv_bytes_at_{max(cfg.lengths)}"] = Metric(mean([rows["kv_bytes_physical"][i] for i in longest]), "bytes",
                                                     False)
    return out


def details(spec: Spec, cfg: LongContextConfig, exs: list[Example], rows: dict[str, list], reused: int) -> dict:
    h = hashlib.sha256()
    for e in exs:
        h.update(str([*e.fitted.context_ids, -1, *e.fitted.query_ids]).encode())
    return {
        "protocol": f"{spec.name}: {spec.source}",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "lengths": cfg.lengths,
        "depths": getattr(cfg, "depths", None) if spec.depths else None,
        "examples": len(exs),
        "examples_sha256": h.hexdigest(),
        "question": cfg.question,
        "kv_measured_at": "when the answer starts (after the prompt; the kv_* metrics: the longest length)",
        "prefill_reused": reused,
        "per_example": rows,
    }


def make_task(spec: Spec, config: type[LongContextConfig], version: str, description: str) -> Task:
    return Task(name=spec.name, version=f"{version}+gen{GENERATOR_VERSION}", description=description, config=config,
                evaluate=lambda lm, cfg, ctx: evaluate(spec, lm, cfg, ctx), quality_metric="accuracy",
                paired_metric="score", check=lambda lm, cfg, steps=(): check(spec, lm, cfg, steps))
