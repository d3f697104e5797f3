"""`w8a8`: naive W8A8 — per-channel int8 weights, *per-tensor* dynamic int8 activations.

The baseline SmoothQuant exists to fix: one activation scale per tensor (``max|X| / 127``) is
set by the few outlier channels, so every other channel is left with a handful of levels and
the model degrades on models with activation outliers. ``W8A8Linear`` (also used by
``smoothquant`` with per-token scales) stores the int8 weight and fp32 per-channel scales as
buffers and runs the matmul through ``torch._int_mm`` (int8 x int8 -> int32, a real int8 GEMM on
this CPU), so execution is ``native``; the int32 result is rescaled by activation x weight scales.
Measured on this machine the int8 GEMM is *not* faster than fp32 for these small matrices (the
int8 speed-up is ``dynamic-int8``'s fbgemm kernel): native here means a real int8 kernel.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimbench.config import Config
from slimbench.method import Method, MethodReport
from slimbench.modeling import CompressedLinear, get_weight, iter_linears

QMAX = 127


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 [out, in], fp32 scale [out])."""
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=1e-8)
    return torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale.float()


def quantize_activation(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 of x [tokens, in]: per tensor (one scale) or per token (one per row)."""
    amax = x.abs().amax().reshape(1, 1) if granularity == "per_tensor" else x.abs().amax(dim=1, keepdim=True)
    scale = (amax / QMAX).clamp(min=1e-8)
    return torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8), scale


class Int8WeightLinear(CompressedLinear):
    """A linear layer stored as an int8 weight with one fp32 scale per output channel.

    The storage and its measurement, shared by the int8 kernels (W8A8 here, dynamic-int8);
    subclasses add only their forward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def load_linear(self, mod: nn.Module) -> Int8WeightLinear:
        """Quantize ``mod``'s weight (and copy its bias) into this layer."""
        q, s = quantize_weight_per_channel(get_weight(mod).float())
        self.qweight.copy_(q)
        self.wscale.copy_(s)
        bias = getattr(mod, "bias", None)
        if bias is not None:
            self.bias.copy_(bias.data.float())
        return self

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale[:, None]

    def weight_storage(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "wscale": self.wscale}


class W8A8Linear(Int8WeightLinear):
    """int8 weight (per-channel scales) x dynamically quantized int8 activations via torch._int_mm."""

    def __init__(self, in_features: int, out_features: int, granularity: str, bias: bool):
        super().__init__(in_features, out_features, bias)
        self.granularity = granularity

    def artifact_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "granularity": self.granularity, "bias": self.bias is not None}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> W8A8Linear:
        return cls(spec["in_features"], spec["out_features"], spec["granularity"], spec["bias"])

    @classmethod
    def from_linear(cls, mod: nn.Module, granularity: str) -> W8A8Linear:
        w = get_weight(mod)
        return cls(w.shape[1], w.shape[0], granularity, getattr(mod, "bias", None) is not None).load_linear(mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        xq, xs = quantize_activation(x2, self.granularity)
        y = torch._int_mm(xq, self.qweight.t()).float() * xs * self.wscale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def replace_linears(model: nn.Module, granularity: str) -> int:
    """Swap every linear layer (lm_head kept) for a W8A8Linear; returns how many."""
    from slimbench.methods.quantization.packed import replace_module

    named = list(iter_linears(model))
    for name, mod in named:
        replace_module(model, name, W8A8Linear.from_linear(mod, granularity))
    return len(named)


class W8A8Config(Config):
    act_granularity: Literal["per_tensor", "per_token"] = Field(
        "per_tensor", description="dynamic activation scale: one per tensor (naive) or one per token"
    )


def apply(lm, cfg: W8A8Config, ctx) -> MethodReport:
    n = replace_linears(lm.model, cfg.act_granularity)
    return MethodReport(
        execution="native",
        details={"weight_bits": 8, "weight_granularity": "per_channel", "act_bits": 8,
                 "act_granularity": cfg.act_granularity, "layers": n, "kernel": "torch._int_mm"},
        notes=["int8 x int8 GEMM through torch._int_mm; activations quantized dynamically at run time"],
    )


METHOD = Method(
    name="w8a8",
    family="quantization",
    description="naive W8A8: int8 per-channel weights, dynamic int8 activations (per-tensor by default)",
    config=W8A8Config,
    apply=apply,
)
