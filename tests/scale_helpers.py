"""Test tasks for the executors, for worker processes and Ray workers too.

Tests register them with the ``stamp_tasks`` fixture (removed again after the test, so no
other test sees them); workers import ``scale_register`` (``preload``), which registers them.

``stamp-a`` and ``stamp-b`` are test models for them: two small linear layers in a plain torch
module, no tokenizer. A sweep's machinery (claims, workers, kills, locks) is what these tests
check, and the zoo's tiny transformers models cost every process that loads one seconds of CPU
(transformers' modelling imports, the 50,257-token GPT-2 tokenizer built on each load); these
load in a millisecond. ``magnitude`` prunes them like any model: a group still compresses.

``stamp`` (quality) and ``stamp_timed`` (timed) append one JSON line per evaluation to
``log``: which cell, which process, when it started and ended. From that file a test sees
how often each cell was computed and whether a timed cell overlapped any other cell.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.lm import LanguageModel
from slimbench.registry import MODELS, TASKS
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.models import ModelEntry


class StampConfig(Config):
    log: str
    tag: str = "a"
    sleep: float = Field(0.2, ge=0)
    allocate_mb: int = Field(0, ge=0, description="memory to take, 50 MB at a time (memory guard tests)")
    value: float | None = Field(1.0, description="the score; null gives NaN")


def cell_identity(lm, cfg: StampConfig, ctx) -> str:
    steps = (ctx.method_report or {}).get("steps", [])
    return json.dumps([lm.name, [s["name"] for s in steps], [s["details"] for s in steps], cfg.tag], default=str)


def stamp(lm, cfg: StampConfig, ctx) -> TaskResult:
    start = time.time()
    hold = []
    for _ in range(cfg.allocate_mb // 50):
        hold.append(torch.ones(50 * 2**20 // 4))  # touched pages: resident memory grows
        time.sleep(0.02)
    time.sleep(cfg.sleep)
    line = {"cell": cell_identity(lm, cfg, ctx), "pid": os.getpid(), "start": start, "end": time.time()}
    with open(cfg.log, "a") as f:  # one short append per line: whole lines even with several writers
        f.write(json.dumps(line) + "\n")
    value = float("nan") if cfg.value is None else cfg.value
    return TaskResult({"score": Metric(value, "points", True)}, {"threads": torch.get_num_threads()})


def tasks() -> list[Task]:
    return [
        Task(name, "1", "test: stamps its run into a log", StampConfig, stamp, "score", timed=timed)
        for name, timed in (("stamp", False), ("stamp_timed", True))
    ]


def load_stamp_model(spec, hw) -> LanguageModel:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)).eval()
    return LanguageModel(model, None, name=spec.name, provenance={"source": "tests/scale_helpers.py",
                                                                   "weights": "random"})


def models() -> list[ModelEntry]:
    return [ModelEntry(name, "test: two linear layers, no tokenizer", load_stamp_model) for name in STAMP_MODELS]


STAMP_MODELS = ("stamp-a", "stamp-b")


def register() -> None:
    for task in tasks():
        if task.name not in TASKS:
            TASKS.register(task)
    for model in models():
        if model.name not in MODELS:
            MODELS.register(model)


def read_log(path) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []



@pytest.fixture(name="stamp_tasks")
def stamp_tasks_fixture(monkeypatch):
    """The `stamp` / `stamp_timed` tasks and the `stamp-a` / `stamp-b` models, registered for one
    test (import this fixture)."""
    for task in tasks():
        monkeypatch.setitem(TASKS.entries, task.name, task)
    for model in models():
        monkeypatch.setitem(MODELS.entries, model.name, model)
    return sys.modules[__name__]


def write_suite(path, text: str, **fmt) -> str:
    path.write_text(text.format(**fmt))
    return str(path)
