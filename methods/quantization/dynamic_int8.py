"""`dynamic-int8`: int8 weights and dynamically quantized int8 activations through a real CPU kernel.

What ``torch.ao.quantization.quantize_dynamic`` does, but as a ``CompressedLinear`` whose
buffers are the checkpoint: ``qweight`` int8 ``[out, in]`` and ``wscale`` fp32 per output channel
(symmetric). The kernel is fbgemm's ``torch.ops.quantized.linear_dynamic`` on a weight prepacked
by ``quantized.linear_prepack``; the prepacked object is not a tensor, so it is kept as a
non-persistent attribute and rebuilt from the buffers after a load.

fbgemm quantizes the activations per tensor (asymmetric uint8, range reduced to 7 bits for
overflow safety), i.e. the activation granularity of naive W8A8. ``kernel: int_mm`` instead uses
per-token symmetric int8 activations through ``torch._int_mm`` (w8a8.py's module). Measured on
this 2-core AVX-512 CPU (576->1536 weight): fp32 70 us, fbgemm 25 us per decode token;
fp32 1.35 ms, fbgemm 0.31 ms for 128 tokens; ``_int_mm`` was not faster than fp32.

``include_lm_head`` (default true, as quantize_dynamic does for every nn.Linear): the output
projection (49152 x 576 on smollm2) dominates decode time, so it is quantized too. With tied
embeddings the embedding keeps its fp32 copy, so memory grows by the int8 head while the stored
checkpoint and the per-token compute shrink; both are measured by the harness.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import Field
from slimbench.methods.quantization.packed import replace_module
from slimbench.methods.quantization.w8a8 import Int8WeightLinear, W8A8Linear
from torch import nn

from slimbench.config import Config
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears


class DynamicInt8Linear(Int8WeightLinear):
    """int8 per-channel weight executed by fbgemm's dynamic-quantized linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias)
        self._packed = None  # fbgemm's prepacked weight: derived, not part of the checkpoint

    def artifact_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> DynamicInt8Linear:
        return cls(spec["in_features"], spec["out_features"], spec["bias"])

    @classmethod
    def from_linear(cls, mod: nn.Module) -> DynamicInt8Linear:
        w = get_weight(mod)
        return cls(w.shape[1], w.shape[0], getattr(mod, "bias", None) is not None).load_linear(mod)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def prepacked(self):
        if self._packed is None:
            with warnings.catch_warnings():  # quantized tensor constructors are marked deprecated
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.wscale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.prepacked(), True)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


KERNEL_NAMES = {"fbgemm": "quantized.linear_dynamic (fbgemm)", "int_mm": "torch._int_mm"}


class DynamicInt8Config(Config):
    kernel: Literal["fbgemm", "int_mm"] = Field(
        "fbgemm", description="fbgemm linear_dynamic (per-tensor activations) or torch._int_mm (per-token)"
    )
    include_lm_head: bool = Field(True, description="quantize the output projection (lm_head) too")


def apply(lm, cfg: DynamicInt8Config, ctx) -> MethodReport:
    named = list(iter_linears(lm.model, include_lm_head=cfg.include_lm_head))
    for name, mod in named:
        new = DynamicInt8Linear.from_linear(mod) if cfg.kernel == "fbgemm" else W8A8Linear.from_linear(mod, "per_token")
        replace_module(lm.model, name, new)
    return MethodReport(
        execution="native",
        details={"kernel": cfg.kernel, "layers": len(named), "lm_head_quantized": cfg.include_lm_head,
                 "weight_bits": 8, "act_bits": 8,
                 "act_granularity": "per_tensor (uint8, 7-bit range)" if cfg.kernel == "fbgemm" else "per_token"},
        notes=[f"real int8 kernel: {KERNEL_NAMES[cfg.kernel]}"],
    )


METHOD = Method(
    name="dynamic-int8",
    family="quantization",
    description="int8 weights + dynamic int8 activations through a real CPU kernel (fbgemm or _int_mm)",
    config=DynamicInt8Config,
    apply=apply,
)
