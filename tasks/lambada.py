"""`lambada`: LAMBADA (OpenAI's version, test): predict a passage's last word.

lm-evaluation-harness 0.4 ``lambada_openai``: context ``" ".join(text.split(" ")[:-1])``,
continuation ``" " + text.split(" ")[-1]``; ``acc`` = the word is the greedy continuation,
``perplexity`` = exp(-mean log p(word | context)) over examples. Online:
``load_dataset("EleutherAI/lambada_openai", "default", split="test", revision=<pinned commit>)``;
offline: ``path`` to a local file with a ``text`` field per row.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from slimbench.tasks import multiple_choice as mc
from slimbench.tasks.shakespeare_lastword import word_perplexity_metric

from slimbench.config import Config
from slimbench.task import Task, TaskResult
from slimbench.zoo.datasets.readers import HubSource, Rows, load_rows
from slimbench.zoo.datasets.shakespeare import fingerprint

SOURCE = HubSource("EleutherAI/lambada_openai", "default", "test")


class LambadaConfig(Config):
    path: str | None = Field(None, description="local file (.jsonl/.json/.parquet) with a `text` field per row")
    revision: str | None = Field(None, description="hub commit to pin when loading online (needs network)")
    limit: int | None = Field(None, ge=1, description="first N passages only (null = all 5153)")
    batch_size: int = Field(16, ge=1, le=1024, description="passages per forward pass")
    seed: int = Field(0, description="bootstrap seed")

    @model_validator(mode="after")
    def _data_is_readable(self):
        if self.path is None and self.revision is None:
            raise ValueError(f"give `path` (a local LAMBADA file) or `revision` (a hub commit of {SOURCE.dataset})")
        if self.path is not None:
            requests(self)
        return self


def requests(cfg: LambadaConfig) -> tuple[list[tuple[str, str]], str]:
    raw, where = load_rows(cfg.path, SOURCE, cfg.revision)
    rows = Rows(where, raw)
    out = []
    for n, r in rows:
        words = rows.text(n, r, "text").split(" ")
        if len(words) < 2:
            raise rows.error(n, "text", "needs at least two words")
        out.append((" ".join(words[:-1]), " " + words[-1]))
    return (out[: cfg.limit] if cfg.limit else out), where


def evaluate(lm, cfg: LambadaConfig, ctx) -> TaskResult:
    reqs, where = requests(cfg)
    scores = lm.loglikelihood(reqs, batch_size=cfg.batch_size)
    lls = [ll for ll, _ in scores]
    acc = [float(g) for _, g in scores]
    return TaskResult(
        metrics={"acc": mc.metric(acc, seed=cfg.seed), "perplexity": word_perplexity_metric(lls, cfg.seed)},
        details={
            "examples": len(reqs),
            "data": {"source": where},
            "examples_sha256": fingerprint(reqs),
            "per_example": {"id": [str(i) for i in range(len(reqs))], "acc": acc, "loglikelihood": lls},
        },
    )


TASK = Task(
    name="lambada",
    version="1",
    description="LAMBADA (OpenAI test): last-word greedy accuracy and word perplexity (lm-eval lambada_openai)",
    config=LambadaConfig,
    evaluate=evaluate,
    quality_metric="acc",
)
