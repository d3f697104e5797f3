"""Typed specs for the cross-product: hardware, model, method steps, task, and a cell."""

from __future__ import annotations

import typing
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
        "fastest now (slimbench.measure.machine.resolve_threads; the choice is recorded)",
    )
    memory_gb: float | None = Field(
        None, gt=0, description="memory a cell may use (GB): what the scheduler reserves and the worker's limit"
    )

    # Where a cell may run, not what it computes: left out of the run id.
    SCHEDULING_FIELDS: typing.ClassVar[frozenset[str]] = frozenset({"memory_gb"})

    @property
    def cpus(self) -> int:
        """CPUs a cell keeps busy: its thread count, or with ``auto`` every core it may use
        (the probe may pick any of them)."""
        if self.threads != "auto":
            return int(self.threads)
        import os

        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

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
        """Short display name: the method's key settings, then parameters that differ from defaults."""
        return step_label(self.name, self.params)


# Settings that say how much a method compresses. A label shows them even at their default
# ("rtn(4-bit, per-channel)", "magnitude(50% sparse)"): a reader should not need to know the
# defaults to read a plot. A method config may name its own with a `label_params` class variable,
# or, when they depend on other settings, a `label_keys(params)` classmethod.
KEY_PARAMS = ("bits", "group_size", "sparsity", "ratio", "dtype")


def _key_text(name: str, value: Any, params: dict[str, Any]) -> str | None:
    if value is None and name != "group_size":
        return None
    if name == "bits":
        return f"{value}-bit"
    if name == "group_size":  # None means one scale per output channel, which only means something with bits
        return f"g{value}" if value is not None else ("per-channel" if params.get("bits") is not None else None)
    if name == "sparsity" and isinstance(value, int | float):
        return f"{value * 100:g}% sparse"
    if name == "dtype":
        return str(value)
    return f"{name}={value}"


def step_label(name: str, params: dict[str, Any]) -> str:
    """The label of one method step from its registered config (every parameter if unknown)."""
    from slimbench.registry import METHODS  # lazy: specs must not import the method registry

    config = METHODS.entries[name].config if name in METHODS else None
    fields = config.model_fields if config is not None else {}
    full = {k: f.default for k, f in fields.items() if not f.is_required()} | dict(params)
    if config is not None and hasattr(config, "label_keys"):
        keys = tuple(config.label_keys(full))
    else:
        keys = tuple(getattr(config, "label_params", KEY_PARAMS)) if config is not None else ()
    parts = [t for k in keys if k in fields and (t := _key_text(k, full.get(k), full)) is not None]
    parts += [
        f"{k}={v}" for k, v in sorted(params.items()) if k not in keys and (k not in fields or fields[k].default != v)
    ]
    return f"{name}({', '.join(parts)})" if parts else name


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
        d = self.to_dict()
        d["hardware"] = {k: v for k, v in d["hardware"].items() if k not in HardwareSpec.SCHEDULING_FIELDS}
        return stable_hash(d)
