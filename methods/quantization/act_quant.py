"""`act-quant`: quantize activations (every linear's input) and the KV cache — W4A8, W4A4, KV4.

The last step of a QuaRot / SpinQuant chain (rotation, then a weight quantizer, then this), or
of any weight quantizer's chain. Activations are quantized per token, symmetric, to ``a_bits``
with the range scaled by ``a_clip`` (QuaRot clips activations at 0.9 of the range for A4);
keys and values per token and head, asymmetric, to ``kv_bits`` (``kv_clip``).

How each linear runs:

- its weight lies on a grid an earlier step stored (rtn, gptq, hqq with ``format: fake``): it
  becomes an :class:`IntActLinear`, which holds that stored form (so the bytes are the same) and
  computes ``Σ_groups scale_g · (x_int · codes_gᵀ − zero_g · Σ x_int)`` with ``torch._int_mm``
  (int8 × int8 → int32, a real integer GEMM on this CPU). 8-bit activations are what that kernel
  is for (``native``); 4-bit activation values go through the same int8 kernel exactly, but no
  int4 GEMM exists here, so W4A4 is labelled ``simulated``;
- otherwise (dense weights, other forms) the input is fake-quantized and the layer runs in fp32
  (``simulated``);
- the KV cache is fake-quantized where attention reads it (``simulated``): it saves no memory here.

Execution is ``native`` only for 8-bit activations on integer weights with a full-precision cache.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from slimbench.methods.quantization.grid import SCALE_DTYPE, decode_codes
from slimbench.methods.quantization.packed import replace_module
from slimbench.methods.quantization.rotation import fake_quantize_tokens, use_rotated_attention
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimbench.config import Config
from slimbench.layerwise import decoder_layers, has_adapter
from slimbench.method import Method, MethodReport
from slimbench.modeling import CompressedLinear, Rebuildable, get_weight, iter_linears


class ActQuantConfig(Config):
    a_bits: int = Field(8, ge=2, le=16, description="activation bits (per token, symmetric); 16 = not quantized")
    a_clip: float = Field(1.0, gt=0, le=1, description="activation range kept, as a fraction of each token's max")
    kv_bits: int = Field(16, ge=2, le=16, description="KV-cache bits (per token and head, asymmetric); 16 = off")
    kv_clip: float = Field(1.0, gt=0, le=1, description="KV range kept, as a fraction of the min-max range")
    int_kernel: Literal["auto", "always", "never"] = Field(
        "auto", description="run grid-stored weights through torch._int_mm: always, never (fake-quant), or auto: "
        "for 8-bit activations only (4-bit ones have no int4 kernel to gain from)")

    @model_validator(mode="after")
    def _something(self):
        if self.a_bits == 16 and self.kv_bits == 16:
            raise ValueError("a_bits and kv_bits are both 16: nothing to quantize")
        if self.a_bits > 8 and self.a_bits != 16:
            raise ValueError(f"a_bits {self.a_bits}: 2-8, or 16 for none")
        if self.kv_bits > 8 and self.kv_bits != 16:
            raise ValueError(f"kv_bits {self.kv_bits}: 2-8, or 16 for none")
        return self


def quantize_tokens_int(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric integers (int8 holding ``bits``-bit values) and scales of x [tokens, in]."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax).to(torch.int8), scale


class IntActLinear(CompressedLinear):
    """A grid-stored weight times integer activations, through ``torch._int_mm`` per weight group."""

    def __init__(self, spec: dict[str, Any], parts: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec = dict(spec)
        self.in_features, self.out_features = spec["in_features"], spec["out_features"]
        self.a_bits, self.a_clip = spec["a_bits"], spec["a_clip"]
        for name, (shape, dtype) in spec["parts"].items():  # the stored form, as given
            t = parts[name].clone() if parts is not None else torch.zeros(shape, dtype=getattr(torch, dtype))
            self.register_buffer(name, t)
        self.register_buffer("bias", torch.zeros(self.out_features) if spec["bias"] else None)
        # rebuilt from a spec (placeholder or meta tensors until loaded): the group bounds it recorded
        self._unpack(spec.get("bounds") if parts is None else None)

    def _unpack(self, bounds: list[int] | None = None) -> None:
        """Integer codes and per-group params, columns sorted by group (non-persistent: derived)."""
        codes, scale, zero, cols = decode_codes(self.weight_storage(), self.out_features, self.in_features)
        order = torch.argsort(cols, stable=True)
        if bounds is None:
            counts = torch.bincount(cols, minlength=scale.shape[1]).tolist()
            bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("codes_t", codes[:, order].to(torch.int8).t().contiguous(), persistent=False)
        self.register_buffer("wscale", scale, persistent=False)
        self.register_buffer("wzero", zero, persistent=False)
        self.bounds = list(bounds)
        self.spec["bounds"] = self.bounds  # the artifact cache rebuilds from the spec without the codes

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._unpack()

    @classmethod
    def from_form(cls, mod: nn.Module, parts: dict[str, torch.Tensor], a_bits: int, a_clip: float) -> IntActLinear:
        w = get_weight(mod)
        kept = {k: v for k, v in parts.items() if k in ("qweight", "scales", "qzeros", "zeros", "g_idx")}
        spec = {"in_features": w.shape[1], "out_features": w.shape[0], "a_bits": a_bits, "a_clip": a_clip,
                "bias": getattr(mod, "bias", None) is not None,
                "parts": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in kept.items()}}
        new = cls(spec, kept)
        if spec["bias"]:
            new.bias.copy_(mod.bias.data.float())
        return new

    def artifact_spec(self) -> dict[str, Any]:
        return self.spec

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any]) -> IntActLinear:
        return cls(spec)

    def weight_storage(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.spec["parts"]}

    def dequantized_weight(self) -> torch.Tensor:
        inv = torch.argsort(self.order)
        codes = self.codes_t.t().float()[:, inv]
        cols = torch.repeat_interleave(torch.arange(len(self.bounds) - 1), torch.diff(torch.tensor(self.bounds)))[inv]
        return self.wscale[:, cols] * (codes - self.wzero[:, cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()[:, self.order]
        xq, xs = quantize_tokens_int(x2, self.a_bits, self.a_clip)
        y = torch.zeros(x2.shape[0], self.out_features)
        for g, (a, b) in enumerate(zip(self.bounds[:-1], self.bounds[1:], strict=True)):
            xg = xq[:, a:b].contiguous()
            acc = torch._int_mm(xg, self.codes_t[a:b]).float()
            y += self.wscale[:, g] * (acc - self.wzero[:, g] * xg.sum(dim=1, keepdim=True, dtype=torch.int32).float())
        y = y * xs
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class FakeAct(Rebuildable):
    """A linear re-typed in place (``__class__``) so that its input is fake-quantized per token:
    same parameters, same names. The artifact cache re-types the rebuilt model's linear."""

    wraps = True
    a_bits: int
    a_clip: float

    def artifact_spec(self) -> dict[str, Any]:
        return {"a_bits": self.a_bits, "a_clip": self.a_clip}

    @classmethod
    def from_artifact_spec(cls, spec: dict[str, Any], existing: nn.Module | None = None) -> nn.Module:
        if type(existing) not in FAKE or FAKE[type(existing)] is not cls:
            raise ValueError(f"{cls.__name__} cannot re-type a {type(existing).__name__}")
        existing.__class__ = cls
        existing.a_bits, existing.a_clip = spec["a_bits"], spec["a_clip"]
        return existing


class FakeActLinear(nn.Linear, FakeAct):
    """An nn.Linear whose input is fake-quantized per token (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(fake_quantize_tokens(x, self.a_bits, self.a_clip, symmetric=True))


class FakeActConv1D(Conv1D, FakeAct):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(fake_quantize_tokens(x, self.a_bits, self.a_clip, symmetric=True))


FAKE = {nn.Linear: FakeActLinear, Conv1D: FakeActConv1D}


def grid_form(parts: dict[str, torch.Tensor] | None) -> bool:
    """A form IntActLinear can run: packed codes and scales, nothing that changes the input (AWQ)."""
    return bool(parts) and {"qweight", "scales"} <= set(parts) and set(parts) <= {
        "qweight", "scales", "qzeros", "zeros", "g_idx"}


def check(lm, cfg: ActQuantConfig) -> None:
    if cfg.kv_bits < 16 and not has_adapter(lm.model):
        raise ValueError(f"kv_bits {cfg.kv_bits}: KV quantization needs a layer-wise adapter for "
                         f"model_type {getattr(lm.model.config, 'model_type', None)!r}")


def quantize_kv(model: nn.Module, bits: int, clip: float) -> int:
    n = 0
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attn is None or not hasattr(attn, "config"):
            raise ValueError(f"{type(layer).__name__} has no attention module the KV quantizer can reach")
        route = use_rotated_attention(attn)
        route.kv_bits, route.kv_clip = bits, clip
        n += 1
    return n


def apply(lm, cfg: ActQuantConfig, ctx) -> MethodReport:
    kernels = {"int_mm": 0, "fake": 0}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    stored = ctx.stored_forms
    use_int = cfg.int_kernel == "always" or (cfg.int_kernel == "auto" and cfg.a_bits == 8)
    if cfg.a_bits < 16:
        for name, mod in list(iter_linears(lm.model)):
            parts = stored.get(f"{name}.weight")
            if use_int and grid_form(parts) and not isinstance(mod, CompressedLinear):
                replace_module(lm.model, name, IntActLinear.from_form(mod, parts, cfg.a_bits, cfg.a_clip))
                kernels["int_mm"] += 1
                continue
            fake = FAKE.get(type(mod))
            if fake is None:
                raise ValueError(f"{name} is a {type(mod).__name__}: act-quant runs dense or grid-stored weights "
                                 "(use format: fake for the weight quantizer before it)")
            mod.__class__ = fake
            mod.a_bits, mod.a_clip = cfg.a_bits, cfg.a_clip
            kernels["fake"] += 1
            if parts:
                kept[f"{name}.weight"] = parts  # still this layer's stored form
    kv_layers = quantize_kv(lm.model, cfg.kv_bits, cfg.kv_clip) if cfg.kv_bits < 16 else 0
    native = cfg.a_bits == 8 and kernels["fake"] == 0 and cfg.kv_bits == 16
    notes = []
    if kernels["int_mm"]:
        notes.append(f"{kernels['int_mm']} linears run integer weights x int{cfg.a_bits} activations through "
                     "torch._int_mm" + ("" if cfg.a_bits == 8 else " (int4 values in the int8 GEMM: no int4 kernel "
                                                                  "here, so simulated)"))
    if kernels["fake"]:
        notes.append(f"{kernels['fake']} linears: fake-quantized inputs, fp32 matmul (simulated)")
    if kv_layers:
        notes.append(f"KV cache fake-quantized to {cfg.kv_bits} bits where attention reads it (simulated)")
    return MethodReport(
        execution="native" if native else "simulated",
        storage=kept,
        details={"a_bits": cfg.a_bits, "a_clip": cfg.a_clip, "a_granularity": "per_token",
                 "kv_bits": cfg.kv_bits, "kv_clip": cfg.kv_clip, "kv_granularity": "per_token_head",
                 "kv_layers": kv_layers, "kernels": kernels, "scale_dtype": str(SCALE_DTYPE)},
        notes=notes,
    )


METHOD = Method(
    name="act-quant",
    family="quantization",
    description="activation (per-token) and KV-cache quantization after a weight quantizer: W4A8 via torch._int_mm, "
                "W4A4 / KV4 simulated",
    config=ActQuantConfig,
    apply=apply,
    check=check,
    # it executes what a weight quantizer stored, so it may follow one (the one exception to
    # "nothing quantizes after quantization"); rotation too, and what quantization may follow
    follows=("pruning", "lowrank", "distillation", "recovery", "precision", "rotation", "quantization"),
    test_params={"a_bits": 4, "kv_bits": 4},
)
