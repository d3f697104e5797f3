"""What a method is: a frozen config plus one transform that reports what it achieved."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from slimbench.config import Config
from slimbench.lm import LanguageModel
from slimbench.specs import HardwareSpec

Execution = Literal["native", "simulated"]
FAMILIES = ("baseline", "precision", "quantization", "pruning", "lowrank", "distillation", "recovery", "acceleration",
            "search")


@dataclass
class MethodReport:
    """What a method achieved, as the method knows it.

    ``execution``: ``native`` when a real kernel or a really smaller model saves time or
    memory; ``simulated`` when the compression lives only as masks or fake-quant values inside
    a dense model. ``storage`` maps parameter names to the tensors of their stored form
    (packed codes, scales, zero-points); the harness serialises it to count real bytes.
    ``details`` holds method-specific achieved values (bits, group size, ...).
    """

    execution: Execution
    storage: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Conditions that may make the result misleading (a calibration budget below what the
    # algorithm needs, ...): copied into the record and shown in the leaderboard.
    warnings: list[str] = field(default_factory=list)


@dataclass
class MethodContext:
    """What a method may use besides the model: hardware and a progress-bar factory.

    Calibration data is drawn by the method itself (slimbench.calibration), from its config.
    """

    hardware: HardwareSpec
    progress: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    description: str
    config: type[Config]
    apply: Callable[[LanguageModel, Any, MethodContext], MethodReport]
    # Checks that need the model's shapes (e.g. a group size dividing every layer): run
    # after loading, before compressing; a ValueError becomes the cell's failure message.
    check: Callable[[LanguageModel, Any], None] | None = None
    # Bump when a change changes what the method produces: the version is part of every run
    # id, so old records of this method are not reused for the new code.
    version: str = "1"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family {self.family!r} not in {FAMILIES}")
