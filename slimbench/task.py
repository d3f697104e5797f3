"""What a task is: a named, versioned protocol with a frozen config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slimbench.config import Config
from slimbench.lm import LanguageModel
from slimbench.specs import HardwareSpec


@dataclass
class Metric:
    value: float
    unit: str
    higher_is_better: bool
    samples: list[float] | None = None  # raw samples (latency), kept for spread
    spread: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TaskResult:
    metrics: dict[str, Metric]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskContext:
    hardware: HardwareSpec
    # The harness' report of the method applied to this model (size, bytes, execution).
    method_report: dict[str, Any] = field(default_factory=dict)
    progress: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    version: str  # bump when a change changes numbers
    description: str
    config: type[Config]
    evaluate: Callable[[LanguageModel, Any, TaskContext], TaskResult]
    # The metric that stands for quality in leaderboards and Pareto plots (None: no quality).
    quality_metric: str | None = None
    # The per-example score in ``details["per_example"]`` whose paired difference decides
    # whether a delta of the quality metric is within noise (None: the quality metric itself).
    paired_metric: str | None = None
    # A timed task measures time (latency, throughput): it never shares the machine with
    # another running cell (an exclusive node lock locally, a whole-node resource on Ray).
    timed: bool = False
    # A timed task whose repeats can alternate with other cells' (A B C, C B A, ...) gives a
    # session: ``session(lm, cfg, ctx)`` -> an object with ``warm()``, ``sample()`` (one timed
    # repeat), ``needs_more()``, ``memory()`` (a reading, see slimbench.measure.memory) and
    # ``result(memory_reading=None)`` -> TaskResult; the harness may set its ``interleaving``
    # (how the repeats alternated) and ``limits_memo``. tasks/efficiency.py is the example.
    session: Callable[[LanguageModel, Any, TaskContext], Any] | None = None
    # Checks against the model's config and the cell's method steps, run by `validate` on a
    # weightless skeleton of the model (``lm.model.config``, ``lm.name``) before anything loads:
    # ``check(lm, cfg, steps)`` with ``steps`` the cell's ``(Method, config)`` pairs; a
    # ValueError refuses the cell with its message (e.g. a context longer than the model takes).
    check: Callable[[Any, Any, Sequence[tuple[Any, Any]]], None] | None = None
