"""`fidelity`: how closely a compressed model follows its own uncompressed version.

Prompt set (fixed, version 1): the corpus split is joined with ``"\\n\\n"``, tokenized once,
cut into windows of ``prompt_len`` tokens, and ``n_prompts`` windows evenly spaced over the
split are kept (the ``perplexity`` task's windows). On every position of every prompt:

- ``kl``: KL(P_base || P_model) of the next-token distributions, in nats, averaged over
  positions (the baseline is the reference distribution, as in distillation).
- ``top1_agreement``: fraction of positions where both models' argmax tokens agree.

And from the first ``gen_prompt_len`` tokens of each prompt, ``gen_tokens`` tokens generated
greedily by each model:

- ``gen_prefix_agreement``: mean fraction of the generated tokens that match the baseline's
  before the first divergence (1 = identical text).
- ``gen_exact_match``: fraction of prompts whose generations are identical.

The baseline (the same model spec loaded without any method, same dtype and device) is run
once and its outputs cached on disk under ``models.cache_dir()/fidelity``, keyed by the model
spec, provenance, hardware, these parameters and a hash of the prompt ids. Its log-probabilities
are stored as float16 (100 MB for SmolLM2 at the defaults); the rounding adds well under 1e-5
nats to the KL (the baseline cell measures this floor). Spreads are over prompts (positions in
one prompt are not independent); per-prompt scores are kept for paired deltas.

A model whose KV cache is lossy (``kv-cache`` quantized or sliding-window) is scored through that
cache, in chunks of the method's ``score_chunk`` positions (tasks/perplexity_cached.py): a plain
forward pass would not use the cache, and its loss would not show.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from slimbench.tasks import multiple_choice as mc
from slimbench.tasks.perplexity import JOIN, windows

from slimbench.config import Config, stable_hash
from slimbench.registry import CORPORA
from slimbench.task import Task, TaskResult

VERSION = "1"


class FidelityConfig(Config):
    corpus: str = Field("shakespeare", description="registered corpus the prompts come from")
    split: str = Field("test", description="corpus split")
    n_prompts: int = Field(16, ge=1, le=4096, description="prompts, evenly spaced over the split")
    prompt_len: int = Field(64, ge=2, le=8192, description="tokens per prompt scored for KL / top-1")
    gen_prompt_len: int = Field(32, ge=1, le=8192, description="prompt tokens before greedy generation")
    gen_tokens: int = Field(32, ge=1, le=1024, description="greedily generated tokens compared")
    batch_size: int = Field(4, ge=1, le=256, description="prompts per forward pass")
    seed: int = Field(0, description="bootstrap seed")


def prompts(lm, cfg: FidelityConfig) -> torch.Tensor:
    ids = lm.encode(JOIN.join(CORPORA.get(cfg.corpus).texts(cfg.split)))
    return windows(ids, cfg.prompt_len, cfg.n_prompts)


def is_uncompressed(method_report: dict) -> bool:
    steps = method_report.get("steps") or []
    return bool(steps) and all(s.get("name") == "baseline" for s in steps)


def through_cache_chunk(lm) -> int | None:
    """Chunk size when the model's KV cache is lossy (kv-cache quantized / sliding-window), else None."""
    factory = getattr(lm, "cache_factory", None)
    return getattr(factory, "score_chunk", None) if getattr(factory, "lossy", False) else None


def scored_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position: one plain forward, or through a lossy KV cache in chunks, so its loss counts."""
    chunk = through_cache_chunk(lm)
    if chunk is None:
        return lm.logits(ids)
    from slimbench.tasks.perplexity_cached import logits_through_cache

    return logits_through_cache(lm, ids, chunk)


@torch.inference_mode()
def outputs(lm, ids: torch.Tensor, cfg: FidelityConfig) -> dict[str, torch.Tensor]:
    """Log-probabilities at every position and greedy generations: what is compared."""
    logp = [F.log_softmax(scored_logits(lm, b).float(), dim=-1).cpu() for b in ids.split(cfg.batch_size)]
    gen_from = ids[:, : min(cfg.gen_prompt_len, ids.shape[1])]
    gen = [lm.greedy(b, cfg.gen_tokens).cpu() for b in gen_from.split(cfg.batch_size)]
    return {"logp": torch.cat(logp), "generated": torch.cat(gen)}


def cache_key(lm, cfg: FidelityConfig, ids: torch.Tensor, hardware) -> str:
    spec = lm.spec.to_dict() if getattr(lm, "spec", None) is not None else {"name": lm.name}
    params = cfg.to_dict()
    params.pop("batch_size")
    params.pop("seed")  # neither changes the baseline's outputs
    data = stable_hash(ids.tolist(), length=32)
    return stable_hash(
        {"task": f"fidelity/{VERSION}", "model": spec, "provenance": lm.provenance,
         "hardware": {"device": hardware.device, "dtype": hardware.dtype}, "params": params, "data": data},
        length=24,
    )


def load_baseline_model(lm, hardware):
    """The uncompressed model with this model's spec (``lm.spec`` when the runner sets it)."""
    from slimbench.specs import ModelSpec
    from slimbench.zoo.models import resolve

    spec = lm.spec if getattr(lm, "spec", None) is not None else ModelSpec(name=lm.name)
    return resolve(spec, source="fidelity", field="model")(spec, hardware)


def baseline_outputs(lm, cfg: FidelityConfig, ids: torch.Tensor, ctx) -> tuple[dict[str, torch.Tensor], dict]:
    """The baseline's outputs, from the disk cache or computed now (and cached atomically)."""
    from slimbench.zoo.models import cache_dir

    key = cache_key(lm, cfg, ids, ctx.hardware)
    path = cache_dir() / "fidelity" / f"{key}.safetensors"
    info = {"cache_key": key, "cache_path": str(path)}
    if path.exists():
        return {k: v for k, v in load_file(path).items()}, {**info, "cache_hit": True}
    if is_uncompressed(ctx.method_report):
        out = outputs(lm, ids, cfg)
    else:
        base = load_baseline_model(lm, ctx.hardware)
        out = outputs(base, ids, cfg)
        del base
    stored = {"logp": out["logp"].half(), "generated": out["generated"].contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(stored, tmp, metadata={"key": json.dumps(key)})
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return stored, {**info, "cache_hit": False}


def compare(base: dict[str, torch.Tensor], mine: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-prompt scores: mean KL, top-1 agreement, generated-prefix agreement, exact match."""
    p_logp = F.log_softmax(base["logp"].float(), dim=-1)  # renormalise after float16 rounding
    q_logp = mine["logp"]
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1).clamp(min=0)  # [prompts, positions]
    top1 = (p_logp.argmax(-1) == q_logp.argmax(-1)).float()
    same = (base["generated"] == mine["generated"]).long()
    prefix = same.cumprod(dim=1).sum(dim=1).float() / same.shape[1]
    return {
        "kl": kl.mean(1).tolist(),
        "top1_agreement": top1.mean(1).tolist(),
        "gen_prefix_agreement": prefix.tolist(),
        "gen_exact_match": (prefix == 1).float().tolist(),
    }


def evaluate(lm, cfg: FidelityConfig, ctx) -> TaskResult:
    ids = prompts(lm, cfg)
    base, info = baseline_outputs(lm, cfg, ids, ctx)
    per = compare(base, outputs(lm, ids, cfg))
    metrics = {
        "kl": mc.metric(per["kl"], "nats/token", higher_is_better=False, seed=cfg.seed),
        "top1_agreement": mc.metric(per["top1_agreement"], seed=cfg.seed),
        "gen_prefix_agreement": mc.metric(per["gen_prefix_agreement"], seed=cfg.seed),
        "gen_exact_match": mc.metric(per["gen_exact_match"], seed=cfg.seed),
    }
    return TaskResult(
        metrics=metrics,
        details={
            "baseline": info,
            "scored_through_cache_chunk": through_cache_chunk(lm),
            "prompts": int(ids.shape[0]),
            "positions": int(ids.numel()),
            "prompt_ids_sha256": stable_hash(ids.tolist(), length=64),
            "data": CORPORA.get(cfg.corpus).manifest(cfg.split),
            "per_example": {"id": [f"prompt{i}" for i in range(ids.shape[0])], **per},
            "kl_max_prompt": float(np.max(per["kl"])),
        },
    )


TASK = Task(
    name="fidelity",
    version=VERSION,
    description="KL to the uncompressed model's next-token distributions, top-1 and greedy-generation agreement",
    config=FidelityConfig,
    evaluate=evaluate,
    quality_metric="kl",
)

