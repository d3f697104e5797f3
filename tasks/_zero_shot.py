"""Standard zero-shot benchmarks as multiple-choice examples (lm-evaluation-harness 0.4 prompts).

Each builder turns validated rows into ``multiple_choice.Example``s with exactly the harness'
prompt, choices and gold index (its task YAML / preprocess functions quoted beside each), so
numbers are comparable with published lm-eval numbers for the same split. ``zero_shot_task``
makes the registered Task: its config takes ``path`` (a local file, offline) or ``revision``
(a hub commit, online), and a local file is read and checked when the config is validated,
so a bad file fails before any model loads, naming the file, the row and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import Field, model_validator
from slimbench.tasks import multiple_choice as mc

from slimbench.config import Config
from slimbench.task import Task, TaskResult
from slimbench.zoo.datasets.readers import HubSource, Rows, load_rows
from slimbench.zoo.datasets.shakespeare import fingerprint

Builder = Callable[[Rows], list[mc.Example]]


class ZeroShotConfig(Config):
    path: str | None = Field(None, description="local file (.jsonl/.json/.parquet/.csv) in the dataset's format")
    revision: str | None = Field(None, description="hub commit to pin when loading online (needs network)")
    limit: int | None = Field(None, ge=1, description="first N examples only (null = all)")
    batch_size: int = Field(16, ge=1, le=1024, description="continuations per forward pass")
    seed: int = Field(0, description="bootstrap seed")


# -- builders (harness prompts) ------------------------------------------------------------------
def hellaswag_preprocess(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py: " [title]" -> ". ", drop [bracketed] WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(rows: Rows) -> list[mc.Example]:
    out = []
    for n, r in rows:
        ctx = rows.text(n, r, "ctx_a") + " " + rows.text(n, r, "ctx_b").capitalize()
        query = hellaswag_preprocess(rows.text(n, r, "activity_label") + ": " + ctx)
        endings = [hellaswag_preprocess(e) for e in rows.texts(n, r, "endings", 4)]
        out.append(mc.Example.from_choices(str(r.get("ind", n)), query, endings, rows.index(n, r, "label", 4)))
    return out


def piqa(rows: Rows) -> list[mc.Example]:
    # "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label
    return [
        mc.Example.from_choices(
            str(n), f"Question: {rows.text(n, r, 'goal')}\nAnswer:",
            [rows.text(n, r, "sol1"), rows.text(n, r, "sol2")], rows.index(n, r, "label", 2),
        )
        for n, r in rows
    ]


def arc(rows: Rows) -> list[mc.Example]:
    # "Question: {{question}}\nAnswer:", choices.text, target choices.label.index(answerKey)
    out = []
    for n, r in rows:
        choices = rows.get(n, r, "choices", dict)
        texts = rows.texts(n, choices, "text")
        labels = rows.texts(n, choices, "label", len(texts))
        key = rows.text(n, r, "answerKey")
        if key not in labels:
            raise rows.error(n, "answerKey", f"{key!r} is not one of the choice labels {labels}")
        q = rows.text(n, r, "question")
        out.append(mc.Example.from_choices(str(r.get("id", n)), f"Question: {q}\nAnswer:", texts, labels.index(key)))
    return out


def winogrande(rows: Rows) -> list[mc.Example]:
    # partial scoring: contexts "sentence up to _ + option", one shared continuation after the blank
    out = []
    for n, r in rows:
        sentence = rows.text(n, r, "sentence")
        if "_" not in sentence:
            raise rows.error(n, "sentence", "has no '_' blank to fill")
        i = sentence.index("_")
        target = sentence[i + 1 :].strip()
        options = [rows.text(n, r, "option1"), rows.text(n, r, "option2")]
        gold = rows.index(n, r, "answer", 2, mapping={"1": 0, "2": 1})
        reqs = tuple((sentence[:i] + o, " " + target) for o in options)
        out.append(mc.Example(str(n), reqs, (len(target), len(target)), gold))
    return out


def boolq(rows: Rows) -> list[mc.Example]:
    # "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"], target label (1 = yes)
    out = []
    for n, r in rows:
        ctx = f"{rows.text(n, r, 'passage')}\nQuestion: {rows.text(n, r, 'question')}?\nAnswer:"
        gold = rows.index(n, r, "label", 2, mapping={"False": 0, "True": 1})
        out.append(mc.Example.from_choices(str(r.get("idx", n)), ctx, ["no", "yes"], gold))
    return out


# -- the task factory -----------------------------------------------------------------------------
def examples(cfg: ZeroShotConfig, source: HubSource, build: Builder) -> tuple[list[mc.Example], str]:
    rows, where = load_rows(cfg.path, source, cfg.revision)
    exs = build(Rows(where, rows))
    return (exs[: cfg.limit] if cfg.limit else exs), where


def provenance(cfg: ZeroShotConfig, source: HubSource, where: str) -> dict[str, str | None]:
    """Where the examples came from: the local file that was read, or the hub dataset at its revision.

    A local file is named as such, with the hub dataset whose format (and prompts) it follows,
    never as if the hub copy had been read.
    """
    hub = f"{source.dataset}/{source.config}:{source.split}" if source.config else f"{source.dataset}:{source.split}"
    if cfg.path is not None:
        return {"read": "local file", "source": where, "format_of": hub}
    return {"read": "hub", "source": where, "hub": hub, "revision": cfg.revision}


def zero_shot_task(name: str, version: str, description: str, source: HubSource, build: Builder,
                   quality: str = "acc") -> Task:
    class TaskConfig(ZeroShotConfig):
        @model_validator(mode="after")
        def _data_is_readable(self):
            if self.path is None and self.revision is None:
                raise ValueError(f"give `path` (a local {name} file) or `revision` (a hub commit of {source.dataset})")
            if self.path is not None:
                examples(self, source, build)  # a bad row fails here, naming file, row and field
            return self

    TaskConfig.__name__ = f"{name.title().replace('-', '')}Config"

    def evaluate(lm, cfg: ZeroShotConfig, ctx) -> TaskResult:
        exs, where = examples(cfg, source, build)
        scored = mc.score(lm, exs, batch_size=cfg.batch_size)
        return TaskResult(
            metrics=mc.accuracy_metrics(scored, seed=cfg.seed),
            details={
                "examples": len(exs),
                "data": provenance(cfg, source, where),
                "examples_sha256": fingerprint([(e.id, e.requests, e.gold) for e in exs]),
                "per_example": mc.per_example(scored),
            },
        )

    return Task(name=name, version=version, description=description, config=TaskConfig, evaluate=evaluate,
                quality_metric=quality)
