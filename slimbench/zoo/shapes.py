"""A model's shapes without its weights, for checks at validation time.

``validate`` must catch a group size that does not divide a layer, a rank larger than a
layer or an N:M pattern that does not fit, without loading (or converting) any weights. The
model's config is cheap to read (a registered model's ``config`` function, or
``AutoConfig`` for a hub id or a folder), and ``from_config`` on the ``meta`` device builds the
module tree with shape-only tensors and no memory. Methods' ``check`` functions read shapes
through the same calls as on a loaded model (``iter_linears``, ``get_weight(m).shape``), so they
run on this skeleton unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from slimbench.specs import ModelSpec


@dataclass
class Skeleton:
    """Stands in for a LanguageModel in shape checks: ``model`` holds meta tensors only."""

    model: torch.nn.Module
    config: Any
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("meta"))
    # the execution hooks of a freshly loaded model (no acceleration step has replaced them yet)
    cache_factory: Any = None
    generator: Any = None


def model_config(spec: ModelSpec) -> Any:
    """The model's transformers config, read without weights; raises if it is not available."""
    from transformers import AutoConfig

    from slimbench.registry import MODELS

    if spec.name in MODELS:
        read = getattr(MODELS.get(spec.name), "config", None)
        if read is None:
            raise LookupError(f"registered model {spec.name} declares no config function")
        return read()
    return AutoConfig.from_pretrained(spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)


def skeleton_of_config(config: Any, name: str = "", trust_remote_code: bool = False) -> Skeleton:
    """The weightless model a transformers config describes (meta tensors, no memory)."""
    from transformers import AutoModel, AutoModelForCausalLM

    # An encoder (its config names a base model, e.g. BertModel) is loaded with AutoModel.
    archs = getattr(config, "architectures", None) or []
    causal = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, trust_remote_code=trust_remote_code)
    return Skeleton(model=model.eval(), config=config, name=name or getattr(config, "model_type", ""))


@functools.lru_cache(maxsize=32)
def _skeleton(spec_json: str) -> Skeleton:
    spec = ModelSpec.model_validate_json(spec_json)
    return skeleton_of_config(model_config(spec), spec.name, spec.trust_remote_code)


def skeleton(spec: ModelSpec) -> Skeleton:
    """The weightless model of ``spec`` (cached: checks never modify it)."""
    return _skeleton(spec.model_dump_json())
