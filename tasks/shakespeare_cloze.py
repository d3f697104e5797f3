"""`shakespeare-cloze`: choose the true next line of a speech among 4 (zero-shot multiple choice).

Construction (``slimbench.zoo.datasets.shakespeare.cloze_items``, version 1): from the 6 works of
the Shakespeare corpus' ``test`` split, draw ``n_examples`` lines (seeded) that have at least
``context_lines`` lines before them in the same speech and at least ``min_chars`` characters.
The context is the speaker tag and those preceding lines (each ending in a newline); the
choices are the true line and 3 lines of at least ``min_chars`` characters drawn from anywhere
in the same play (never equal to the true line), in a seeded random order. Chance is 25%.
Scored by the multiple-choice engine: ``acc`` and character-length-normalised ``acc_norm``
(lm-evaluation-harness semantics), each with its standard error and a bootstrap interval;
per-example scores are kept for paired deltas.
"""

from __future__ import annotations

from pydantic import Field
from slimbench.tasks import multiple_choice as mc

from slimbench.config import Config
from slimbench.registry import CORPORA
from slimbench.task import Task, TaskResult
from slimbench.zoo.datasets.shakespeare import cloze_items, fingerprint


class ClozeConfig(Config):
    n_examples: int = Field(500, ge=1, le=100000, description="examples drawn from the test split")
    context_lines: int = Field(3, ge=1, le=20, description="lines of the speech shown before the blank")
    min_chars: int = Field(20, ge=1, le=200, description="shortest line used as a target or distractor")
    seed: int = Field(0, description="seed of the draw (examples, distractors, order) and the bootstrap")
    batch_size: int = Field(16, ge=1, le=1024, description="continuations per forward pass")


def build(cfg: ClozeConfig) -> list[mc.Example]:
    items = cloze_items(cfg.n_examples, context_lines=cfg.context_lines, min_chars=cfg.min_chars, seed=cfg.seed)
    # The context ends in a newline and the line follows it directly: no delimiter.
    return [mc.Example.from_choices(i.id, i.context, i.choices, i.gold, delimiter="") for i in items]


def evaluate(lm, cfg: ClozeConfig, ctx) -> TaskResult:
    examples = build(cfg)
    scored = mc.score(lm, examples, batch_size=cfg.batch_size)
    return TaskResult(
        metrics=mc.accuracy_metrics(scored, seed=cfg.seed),
        details={
            "examples": len(examples),
            "chance": 0.25,
            "examples_sha256": fingerprint([(e.id, e.requests, e.gold) for e in examples]),
            "data": CORPORA.get("shakespeare").manifest("test"),
            "per_example": mc.per_example(scored),
        },
    )


TASK = Task(
    name="shakespeare-cloze",
    version="1",
    description="choose the true next line of a Shakespeare speech among 4 lines of the same play (acc, acc_norm)",
    config=ClozeConfig,
    evaluate=evaluate,
    quality_metric="acc",
)
