"""`shakespeare-lastword`: predict the last word of a speech (LAMBADA-style).

Construction (``slimbench.zoo.datasets.shakespeare.lastword_items``, version 1): from the
``test`` split, speeches of at least 3 lines whose last line ends in a word of at least 3
letters preceded by a space; the passage is the speaker tag and the speech's last 6 lines;
trailing punctuation after the word is dropped. ``n_examples`` are drawn (seeded).

Scoring is lm-evaluation-harness' ``lambada``: the request is (passage without the word,
``" " + word``);

- ``acc``: the word's tokens are all the greedy (argmax) tokens, i.e. greedy decoding writes
  exactly this word;
- ``perplexity``: exp(-mean over examples of log p(word | passage)) - per *word*, not per token.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field
from slimbench.tasks import multiple_choice as mc

from slimbench.config import Config
from slimbench.measure import stats
from slimbench.registry import CORPORA
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.datasets.shakespeare import fingerprint, lastword_items


class LastWordConfig(Config):
    n_examples: int = Field(500, ge=1, le=100000, description="passages drawn from the test split")
    max_lines: int = Field(6, ge=1, le=50, description="lines of the speech kept in the passage")
    seed: int = Field(0, description="seed of the draw and of the bootstrap")
    batch_size: int = Field(16, ge=1, le=1024, description="passages per forward pass")


def word_perplexity_metric(lls: list[float], seed: int) -> Metric:
    """exp(-mean log-likelihood) with a bootstrap interval; stderr is that of the mean NLL."""
    nll = -np.asarray(lls)
    lo, hi = stats.bootstrap_ci(nll, lambda x: math.exp(x.mean()), seed=seed)
    spread = {"nll_stderr": stats.mean_stderr(nll), "ci_low": lo, "ci_high": hi, "confidence": 0.95,
              "n": float(len(nll))}
    return Metric(math.exp(nll.mean()), "ppl", higher_is_better=False, spread=spread)


def evaluate(lm, cfg: LastWordConfig, ctx) -> TaskResult:
    items = lastword_items(cfg.n_examples, max_lines=cfg.max_lines, seed=cfg.seed)
    scores = lm.loglikelihood([(i.context, " " + i.word) for i in items], batch_size=cfg.batch_size)
    lls = [ll for ll, _ in scores]
    acc = [float(g) for _, g in scores]
    return TaskResult(
        metrics={"acc": mc.metric(acc, seed=cfg.seed), "perplexity": word_perplexity_metric(lls, cfg.seed)},
        details={
            "examples": len(items),
            "examples_sha256": fingerprint([(i.id, i.context, i.word) for i in items]),
            "data": CORPORA.get("shakespeare").manifest("test"),
            "per_example": {"id": [i.id for i in items], "acc": acc, "loglikelihood": lls},
        },
    )


TASK = Task(
    name="shakespeare-lastword",
    version="1",
    description="LAMBADA-style last-word prediction on Shakespeare speeches (greedy acc, word perplexity)",
    config=LastWordConfig,
    evaluate=evaluate,
    quality_metric="acc",
)
