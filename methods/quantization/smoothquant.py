"""`smoothquant`: SmoothQuant (Xiao et al., 2023) — migrate activation outliers into the weights, then W8A8.

1. Calibrate: run the original model on the calibration sequences and record, for every
   linear layer, the per-input-channel ``max|X_j|`` (hooks; one forward per sample).
2. Smooth every (norm -> linears) pair of the adapter: ``s_j = max|X_j|^alpha / max_m max_i |W_m[i, j]|^(1 - alpha)``;
   the norm's weight (and bias) is divided by ``s`` and every linear it feeds gets ``W * s``,
   so the function is unchanged (tested) while the linears' inputs lose their outlier channels.
   Linears with no preceding norm (o_proj, down_proj, ...) are not smoothed, as in the paper.
3. W8A8: every linear becomes a ``W8A8Linear`` (w8a8.py): per-channel int8 weights and per-token
   dynamic int8 activations through ``torch._int_mm`` (a real int8 GEMM: ``native``).

The method reports the outlier statistics that explain naive W8A8's failure: per layer, the
largest channel max|X| over the median channel max|X| at each smoothed input, before and after.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from slimbench.methods.quantization.awq import fold_into_norm
from slimbench.methods.quantization.w8a8 import replace_linears
from torch import nn

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import adapter_for, decoder_layers
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class SmoothQuantConfig(CalibrationConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 = none, 1 = all into weights")
    act_granularity: Literal["per_token", "per_tensor"] = Field("per_token", description="dynamic activation scales")
    quantize: bool = Field(True, description="false: smoothing only (a check that it preserves the function)")
    calib_samples: int = Field(16, ge=1, le=100000, description="calibration sequences")


@torch.no_grad()
def activation_channel_max(model: nn.Module, calib: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """{linear name: per-input-channel max|X|} over the calibration sequences."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args, out):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in iter_linears(model)]
    try:
        for sample in calib:
            model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = act_max.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)
    return s.clamp(min=1e-5)


def outlier_ratio(channel_max: torch.Tensor) -> float:
    """max over channels of max|X_j| divided by the median channel's max|X_j|."""
    return float(channel_max.max() / channel_max.median().clamp(min=1e-8))


@torch.no_grad()
def smooth(model: nn.Module, act_max: dict[str, torch.Tensor], alpha: float) -> list[dict[str, Any]]:
    """Fold the smoothing scales into every adapter norm -> linears pair; returns per-pair stats."""
    adapter = adapter_for(model)
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"{adapter.layers_path}.{i}."
        for norm_name, lin_names in adapter.norm_linear_pairs:
            mods = [layer.get_submodule(n) for n in lin_names]
            x_max = act_max[prefix + lin_names[0]]
            s = smoothing_scales(x_max, [get_weight(m).float() for m in mods], alpha)
            fold_into_norm(layer.get_submodule(norm_name), s)
            for m in mods:
                set_weight(m, get_weight(m).float() * s)
            out.append({"layer": i, "input_of": lin_names[0].rsplit(".", 1)[0] + "." + "/".join(
                n.rsplit(".", 1)[-1] for n in lin_names), "outlier_ratio_before": outlier_ratio(x_max),
                "outlier_ratio_after": outlier_ratio(x_max / s), "max_abs_before": float(x_max.max()),
                "max_abs_after": float((x_max / s).max())})
    return out


def check(lm, cfg: SmoothQuantConfig) -> None:
    adapter = adapter_for(lm.model)  # raises "no layer-wise adapter for model_type ..."
    if not adapter.norm_linear_pairs:
        raise ValueError(f"adapter {adapter.name} declares no norm -> linear pairs: nothing to smooth into")


def unsmoothed_outliers(act_max: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Summary over every linear input of the original model (the naive W8A8 picture)."""
    ratios = {n: outlier_ratio(m) for n, m in act_max.items()}
    worst = max(ratios, key=ratios.get)
    return {"outlier_ratio_max": ratios[worst], "outlier_ratio_max_layer": worst,
            "outlier_ratio_median": float(torch.tensor(list(ratios.values())).median()),
            "act_max_abs": max(float(m.max()) for m in act_max.values())}


def apply(lm, cfg: SmoothQuantConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    t0 = time.perf_counter()
    act_max = activation_channel_max(lm.model, calib, lm.device)
    pairs = smooth(lm.model, act_max, cfg.alpha)
    n = replace_linears(lm.model, cfg.act_granularity) if cfg.quantize else 0
    details = {
        "alpha": cfg.alpha, "calibration": info, "smoothed_pairs": len(pairs), "quantized_layers": n,
        "weight_bits": 8 if cfg.quantize else None, "act_granularity": cfg.act_granularity if cfg.quantize else None,
        "all_inputs": unsmoothed_outliers(act_max), "smoothed_inputs": pairs, "seconds": time.perf_counter() - t0,
    }
    return MethodReport(
        execution="native" if cfg.quantize else "simulated",
        details=details,
        notes=["W8A8 through torch._int_mm (real int8 GEMM)" if cfg.quantize else "smoothing only: fp32 model"],
    )


METHOD = Method(
    name="smoothquant",
    family="quantization",
    description="SmoothQuant: migrate activation outliers into weights (alpha), then W8A8 per-channel/per-token",
    config=SmoothQuantConfig,
    apply=apply,
    check=check,
    calibration_need="activation-statistics",
)
