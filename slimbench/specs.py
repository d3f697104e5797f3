"""Typed specs for the cross-product: hardware, model, method steps, task, and a cell."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from slimbench.config import Config, stable_hash

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HardwareSpec(Config):
    """Where and how a cell runs. `dtype` is the dtype the model is loaded in."""

    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: Annotated[int, Field(ge=1, le=512)] | Literal["auto"] = Field(
        2,
        description="torch intra-op threads (CPU); auto: probe each count when the cell starts and use the "
        "fastest now (slimbench.machine.resolve_threads; the choice is recorded)",
    )

    @field_validator("device")
    @classmethod
    def _device_available(cls, v: str) -> str:
        if v == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use device: cpu")
        return v

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class ModelSpec(Config):
    """A registered model name, a Hugging Face hub id, or a local folder."""

    name: str
    revision: str | None = Field(None, description="hub revision (commit/tag) to pin")
    trust_remote_code: bool = Field(False, description="run code shipped with the model")


def registered_identity(registry: Any, name: str, version: str | None, provider: str | None) -> tuple:
    """The (version, provider) of a registered entry, where a spec leaves them unset.

    Both are part of the run id: a changed method (a new version, a plugin update) computes
    its cells again instead of reusing records of the old code.
    """
    if version is None and name in registry:
        version = registry.get(name).version
        provider = registry.provider(name)
    return version, provider


class StepSpec(Config):
    """One method application: its registered name, version, provider and validated params."""

    name: str
    params: dict[str, Any]
    version: str | None = Field(None, description="the method's version (filled from the registry)")
    provider: str | None = Field(None, description="plugin distribution `name==version`; None: built in")

    @model_validator(mode="after")
    def _identity(self):
        from slimbench.registry import METHODS  # lazy: specs must not import the registry at import time

        version, provider = registered_identity(METHODS, self.name, self.version, self.provider)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "provider", provider)
        return self

    def label(self) -> str:
        """Short display name: only the parameters that differ from the method's defaults."""
        from slimbench.registry import METHODS  # lazy: specs must not import the method registry

        fields = METHODS.entries[self.name].config.model_fields if self.name in METHODS else {}
        shown = {k: v for k, v in sorted(self.params.items()) if k not in fields or fields[k].default != v}
        inner = ",".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.name}({inner})" if inner else self.name


class MethodSpec(Config):
    """A method config: one step, or several applied in order (e.g. prune then quantize)."""

    steps: tuple[StepSpec, ...]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps)

    def label(self) -> str:
        return " + ".join(s.label() for s in self.steps)

    def to_record(self) -> dict[str, Any]:
        params = self.steps[0].params if len(self.steps) == 1 else {}
        return {
            "name": self.name,
            "label": self.label(),
            "params": params,
            "steps": [s.to_dict() for s in self.steps],
        }


class TaskSpec(Config):
    name: str
    version: str
    params: dict[str, Any]
    provider: str | None = Field(None, description="plugin distribution `name==version`; None: built in")

    def label(self) -> str:
        return f"{self.name}@{self.version}"


class CellSpec(Config):
    """One point of the cross-product. Its hash is the run id."""

    model: ModelSpec
    method: MethodSpec
    task: TaskSpec
    hardware: HardwareSpec

    @property
    def run_id(self) -> str:
        return stable_hash(self.to_dict())
