"""Requests cut from real corpus text: prompt and output lengths follow the text, not one fixed size.

A corpus split is cut into blocks at blank lines (in the Shakespeare corpus: speeches, stage
directions, scene headings). Request ``i`` starts at a block drawn with
``random.Random(seed)``: its prompt is ``prompt_blocks`` consecutive blocks (their natural
lengths vary), cut to the last ``max_prompt_tokens`` tokens if longer; its output length is the
token length of the block that follows (the real reply), clipped to
``[min_output_tokens, max_output_tokens]``. So a short line is answered briefly and a long
speech at length, as in the text.

The rows are written as JSON lines (``prompt``, ``output_tokens_count``) that GuideLLM reads
as a dataset; every request asks for exactly its output length (``ignore_eos``), so a
compressed model that stops early does not look faster for doing less work.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimbench.registry import CORPORA


@dataclass(frozen=True)
class WorkloadSpec:
    corpus: str = "shakespeare"
    split: str = "test"
    requests: int = 512
    prompt_blocks: int = 4
    max_prompt_tokens: int = 512
    min_output_tokens: int = 8
    max_output_tokens: int = 128
    seed: int = 0


def blocks_of(texts: list[str]) -> list[str]:
    """The non-empty blank-line-separated blocks of every document, in order."""
    out: list[str] = []
    for text in texts:
        out += [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    return out


def build_rows(tokenizer: Any, spec: WorkloadSpec) -> list[dict[str, Any]]:
    """``spec.requests`` rows of {prompt, prompt_tokens, output_tokens_count}, deterministic in the seed."""
    blocks = blocks_of(CORPORA.get(spec.corpus).texts(spec.split))
    if len(blocks) < spec.prompt_blocks + 2:
        raise ValueError(f"{spec.corpus}/{spec.split} has {len(blocks)} text blocks; need > {spec.prompt_blocks + 1}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rng = random.Random(spec.seed)
    rows = []
    for _ in range(spec.requests):
        start = rng.randrange(len(blocks) - spec.prompt_blocks)
        prompt = "\n\n".join(blocks[start : start + spec.prompt_blocks])
        ids = encode(prompt)
        if len(ids) > spec.max_prompt_tokens:  # keep the end: it leads into the reply
            ids = ids[-spec.max_prompt_tokens :]
            prompt = tokenizer.decode(ids)
        reply = len(encode(blocks[start + spec.prompt_blocks]))
        out = min(max(reply, spec.min_output_tokens), spec.max_output_tokens)
        rows.append({"prompt": prompt, "prompt_tokens": len(ids), "output_tokens_count": out})
    return rows


def distribution(values: list[int]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "min": float(a.min()), "p10": float(np.percentile(a, 10)),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def write_rows(rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Write the dataset GuideLLM reads; return its summary (lengths, sha256) for the record."""
    lines = [json.dumps({"prompt": r["prompt"], "output_tokens_count": r["output_tokens_count"]}) for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return {
        "requests": len(rows),
        "prompt_tokens": distribution([r["prompt_tokens"] for r in rows]),
        "output_tokens": distribution([r["output_tokens_count"] for r in rows]),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
