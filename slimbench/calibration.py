"""Calibration data: seeded random segments of the corpus' `calibration` split.

Like GPTQ's C4 sampler: the split's documents are joined with "\\n\\n" and tokenized once,
then ``n`` start positions are drawn with ``random.Random(seed)`` and a window of ``seqlen``
tokens is cut at each. The calibration split shares no document with validation or test.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.corpora import encode_split
from slimbench.registry import CORPORA


class CalibrationConfig(Config):
    """Fields every calibration-based method config inherits (part of the method's identity)."""

    calib_corpus: str = Field("shakespeare", description="corpus whose calibration split is sampled")
    calib_samples: int = Field(128, ge=1, le=100000, description="calibration sequences")
    calib_seqlen: int = Field(512, ge=8, le=131072, description="tokens per calibration sequence")
    calib_seed: int = Field(0, description="seed of the segment sampler")


def calibration_tokens(lm, corpus: str) -> list[int]:
    return encode_split(lm, corpus, "calibration")


def sample_calibration(lm, cfg: CalibrationConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """[calib_samples, calib_seqlen] token ids and the record of how they were drawn."""
    ids = calibration_tokens(lm, cfg.calib_corpus)
    if len(ids) <= cfg.calib_seqlen:
        raise ValueError(f"calibration split has {len(ids)} tokens, not more than calib_seqlen {cfg.calib_seqlen}")
    rng = random.Random(cfg.calib_seed)
    starts = [rng.randint(0, len(ids) - cfg.calib_seqlen - 1) for _ in range(cfg.calib_samples)]
    batch = torch.tensor([ids[s : s + cfg.calib_seqlen] for s in starts], dtype=torch.long)
    info = {
        "corpus": cfg.calib_corpus,
        "split": "calibration",
        "samples": cfg.calib_samples,
        "seqlen": cfg.calib_seqlen,
        "seed": cfg.calib_seed,
        "tokens": batch.numel(),
        "data_sha256": CORPORA.get(cfg.calib_corpus).manifest("calibration")["sha256"],
    }
    return batch, info
