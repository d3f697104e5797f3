"""`layer-drop`: keep every k-th decoder layer (or n evenly spaced layers), no training.

The untrained starting point of `distill`'s student: the same really-smaller model (native),
so "before training" is measured by the same tasks as the distilled student.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from slimbench.methods.distillation.student import kept_layers

from slimbench.config import Config
from slimbench.layerwise import drop_layers, teacher_depth
from slimbench.method import Method, MethodReport
from slimbench.modeling import count_parameters


class DepthConfig(Config):
    keep_every: int | None = Field(None, ge=1, description="keep layers 0, k, 2k, ... (default 2 if neither is set)")
    student_layers: int | None = Field(None, ge=1, description="keep n evenly spaced layers (first, last kept)")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.keep_every is not None and self.student_layers is not None:
            raise ValueError("give either keep_every or student_layers, not both")
        return self


def check(lm, cfg: DepthConfig) -> None:
    kept_layers(teacher_depth(lm.model), cfg.keep_every, cfg.student_layers)  # raises if deeper than the teacher


def depth_details(depth: int, keep: list[int], params_before: int, params_after: int) -> dict:
    return {
        "teacher_layers": depth,
        "student_layers": len(keep),
        "kept_layers": keep,
        "teacher_parameters": params_before,
        "student_parameters": params_after,
    }


def apply(lm, cfg: DepthConfig, ctx) -> MethodReport:
    depth = teacher_depth(lm.model)
    keep = kept_layers(depth, cfg.keep_every, cfg.student_layers)
    before = count_parameters(lm.model)
    drop_layers(lm.model, keep)
    return MethodReport(
        execution="native",
        details=depth_details(depth, keep, before, count_parameters(lm.model)),
        notes=["layers really removed; no training"],
    )


METHOD = Method(
    name="layer-drop",
    family="pruning",
    description="depth pruning: keep every k-th decoder layer (or n evenly spaced), no training (native)",
    config=DepthConfig,
    apply=apply,
    check=check,
    changes_shapes=True,
    follows=("precision", "distillation"),  # earlier stored forms would describe dropped layers
)
