"""`attention`: the attention kernel the model runs, as a choice a suite can sweep.

- ``eager``: transformers' reference implementation (matmul, softmax, matmul: the T x T scores
  are materialised).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient
  kernels where torch has them, CPU included); transformers' default.
- ``flash``: the flash-attn package's FlashAttention-2 kernels: CUDA only, and only where the
  package is installed; refused in ``check()`` otherwise.
- ``flex``: torch's ``flex_attention``, compiled on first use (a minute or more on a small CPU);
  only for architectures transformers supports it for.

Switched with ``model.set_attn_implementation``; the logits agree with eager within float
rounding (tested on the tiny models: below 1e-5). Apply it before ``compile``: a compiled graph
keeps the kernel it was traced with.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from slimbench.config import Config
from slimbench.method import Method, MethodReport

HF_NAMES = {"eager": "eager", "sdpa": "sdpa", "flash": "flash_attention_2", "flex": "flex_attention"}


class AttentionConfig(Config):
    implementation: Literal["eager", "sdpa", "flash", "flex"] = Field(
        "sdpa", description="attention kernel: eager, sdpa, flash (CUDA + flash-attn), flex (compiled)"
    )


def check(lm, cfg: AttentionConfig) -> None:
    model, impl = lm.model, cfg.implementation
    if hasattr(model, "_orig_mod") or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"attention needs an eager transformers model; {lm.name} runs as {type(model).__name__} "
                         "(apply attention before compile)")
    if impl == "flash":
        if lm.device.type != "cuda":
            raise ValueError(f"attention flash runs FlashAttention-2 CUDA kernels; this cell runs on {lm.device.type}: "
                             "use sdpa (torch's fused attention) or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attention flash needs the flash-attn package, which is not installed: use sdpa")
        if not getattr(model, "_supports_flash_attn", False):
            raise ValueError(f"{type(model).__name__} does not support FlashAttention-2 in transformers: use sdpa")
    if impl == "flex" and not getattr(model, "_supports_flex_attn", False):
        raise ValueError(f"{type(model).__name__} does not support flex_attention in transformers: use sdpa or eager")
    if impl == "sdpa" and not getattr(model, "_supports_sdpa", True):
        raise ValueError(f"{type(model).__name__} does not support sdpa in transformers: use eager")


def apply(lm, cfg: AttentionConfig, ctx) -> MethodReport:
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation(HF_NAMES[cfg.implementation])
    now = lm.model.config._attn_implementation
    if now != HF_NAMES[cfg.implementation]:  # transformers only warns when a model cannot switch
        want = HF_NAMES[cfg.implementation]
        raise ValueError(f"{type(lm.model).__name__} kept attention {now!r} instead of {want!r}")
    warnings = [] if before != now else [f"the model already ran {now!r} attention: this step changed nothing"]
    return MethodReport(
        execution="native",
        details={"implementation": cfg.implementation, "transformers_name": now, "before": before},
        warnings=warnings,
    )


METHOD = Method(
    name="attention",
    family="acceleration",
    description="attention kernel: eager, sdpa (default), flash (CUDA + flash-attn), flex (torch flex_attention)",
    config=AttentionConfig,
    apply=apply,
    check=check,
    # the tiny models load with sdpa, so the contract switches them to the other kernel
    test_params={"implementation": "eager"},
)
