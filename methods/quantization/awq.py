"""`awq`: activation-aware weight quantization (Lin et al., 2023), after llm-awq's auto_scale/auto_clip.

For each group of linear layers fed by the same input (the adapter's true-sequential groups:
q/k/v, o, gate/up, down), on the calibration activations ``X`` of that group:

1. Scale search: ``s = mean|X|^alpha`` per input channel (normalised by ``sqrt(max s * min s)``
   as in llm-awq), for ``alpha`` on a ``grid``-point grid in [0, 1); keep the alpha minimising
   ``sum_m ||X W_mᵀ - (X / s) Q(W_m s)ᵀ||²`` over the group's linears. ``alpha = 0`` is plain RTN,
   so the chosen scales never do worse than RTN on the calibration tokens.
2. Clipping search (optional): per output row and group, shrink the max |w| by a ratio in
   (0.5, 1] (``grid`` steps) and keep the ratio minimising that group's output error.
3. Group-wise quantization of ``W s`` on the shared grid.

Where the scales go: if a norm feeds exactly this group (adapter ``norm_linear_pairs``), ``1/s``
is folded into the norm's weight (and bias), as in AWQ, and the stored form is the usual one.
Otherwise (o_proj, down_proj, GPT-2's c_proj, OPT's out_proj/fc2) we do *not* fold into the
preceding linear (llm-awq folds into v_proj / up_proj, which would change those already
quantized layers' stored codes); instead the layer keeps ``1/s`` as an fp16 per-input-channel
``input_scale`` in its stored form (counted in the bytes) and its dense weight is ``Q(W s) / s``.
Execution is simulated (fake-quant).

Cost: instead of multiplying candidate weights by the activations (llm-awq re-runs the block on a
token sample), both searches use the Gram matrix ``G = XᵀX`` of *all* calibration tokens of the
group, streamed like GPTQ's Hessian: ``||X Δᵀ||² = sum((Δ G) * Δ)``, exact and independent of the
token count (the clipping search uses G's diagonal blocks, one per group of input channels).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from slimbench.methods.quantization.grid import SCALE_DTYPE, GridConfig, check_group_size, quantize_matrix, stored_form
from torch import nn

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import adapter_for, sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class AWQConfig(GridConfig, CalibrationConfig):
    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int | None = Field(128, ge=8, description="input channels per group; null = per output channel")
    grid: int = Field(20, ge=2, le=200, description="points of the alpha grid and of the clipping grid")
    clip: bool = Field(True, description="search a clipping ratio per row and group (max shrink to 0.5)")
    search_rows: int | None = Field(
        512, ge=1, description="output rows per linear (seeded sample) scoring the alpha search; null = all"
    )
    calib_samples: int = Field(32, ge=1, le=100000, description="calibration sequences")


def fake_q(w: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    return quantize_matrix(w, cfg)[1]


def output_error(g: torch.Tensor, ws: list[torch.Tensor], s: torch.Tensor, cfg: GridConfig) -> float:
    """sum_m ||X W_mᵀ - (X/s) Q(W_m s)ᵀ||² over a group's linears, from the Gram matrix G = XᵀX."""
    total = 0.0
    for w in ws:
        d = w - fake_q(w * s, cfg) / s
        total += float(((d @ g) * d).sum())
    return total


@torch.no_grad()
def search_scale(
    g: torch.Tensor, x_mean: torch.Tensor, ws: list[torch.Tensor], cfg: AWQConfig
) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-channel scale (rounded to fp16, as stored), its alpha and the loss curve."""
    losses, best = [], (None, 0.0, float("inf"))
    for i in range(cfg.grid):
        alpha = i / cfg.grid
        s = x_mean.clamp(min=1e-4) ** alpha
        s = (s / (s.max() * s.min()).sqrt()).to(SCALE_DTYPE).float()
        loss = output_error(g, ws, s, cfg)
        losses.append(loss)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], losses


def clip_weight(w: torch.Tensor, g: torch.Tensor, cfg: AWQConfig) -> tuple[torch.Tensor, float]:
    """Clip each (row, group) of ``w`` at the ratio of its max|w| that minimises its output error.

    ``g`` is the Gram matrix of the inputs ``w`` sees; a group's error uses its diagonal block.
    """
    out_f, in_f = w.shape
    gs = cfg.group_size or in_f
    n_groups = in_f // gs
    wg = w.reshape(out_f, n_groups, gs)
    blocks = torch.stack([g[k * gs : (k + 1) * gs, k * gs : (k + 1) * gs] for k in range(n_groups)])
    max_abs = wg.abs().amax(dim=2, keepdim=True)
    best_err = torch.full((out_f, n_groups), float("inf"))
    best = wg.clone()
    for i in range(cfg.grid):
        r = 1 - 0.5 * i / cfg.grid  # 1.0 down to just above 0.5
        clipped = torch.clamp(wg, -max_abs * r, max_abs * r)
        d = wg - fake_q(clipped.reshape(out_f, in_f), cfg).reshape_as(wg)
        err = torch.einsum("ogk,gkl,ogl->og", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(2), clipped, best)
    shrunk = float((best.abs().amax(2) < max_abs.squeeze(2)).float().mean())
    return best.reshape(out_f, in_f), shrunk


class AWQGroup:
    """The linears of one true-sequential group: searched and quantized together."""

    def __init__(self, model: nn.Module, prefix: str, names: tuple[str, ...], norm: str | None, cfg: AWQConfig):
        self.model, self.prefix, self.names, self.norm, self.cfg = model, prefix, names, norm, cfg
        self.gram: torch.Tensor | None = None  # XᵀX over every calibration token
        self.abs_sum: torch.Tensor | None = None
        self.n = 0
        self.results: dict[str, Any] | None = None

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.float()
        if self.gram is None:
            self.gram, self.abs_sum = inp.t() @ inp, inp.abs().sum(0)
        else:
            self.gram += inp.t() @ inp
            self.abs_sum += inp.abs().sum(0)
        self.n += inp.shape[0]

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """A seeded sample of output rows: the search loss is a sum over rows, so a sample
        estimates it at a fraction of the cost (the clipping search still sees every row)."""
        n = self.cfg.search_rows
        if n is None or n >= w.shape[0]:
            return w
        gen = torch.Generator().manual_seed(self.cfg.calib_seed)
        return w[torch.randperm(w.shape[0], generator=gen)[:n]]

    def run(self) -> dict[str, Any]:
        mods = {n: self.model.get_submodule(self.prefix + n) for n in self.names}
        ws = {n: get_weight(m).float().clone() for n, m in mods.items()}
        g = self.gram / self.n  # per-token losses
        s, alpha, losses = search_scale(g, self.abs_sum / self.n, [self.rows(w) for w in ws.values()], self.cfg)
        out: dict[str, Any] = {}
        for n, m in mods.items():
            w = ws[n] * s
            shrunk = 0.0
            if self.cfg.clip:
                w, shrunk = clip_weight(w, g / s[:, None] / s[None, :], self.cfg)
            codes, deq, params = quantize_matrix(w, self.cfg)
            stored = stored_form(codes, params)
            if self.norm is None:  # keep 1/s with the layer (see the module docstring)
                set_weight(m, deq / s)
                stored["input_scale"] = (1 / s).to(SCALE_DTYPE)
            else:
                set_weight(m, deq)
            out[n] = {"stored": stored, "alpha": alpha, "clip_shrunk": shrunk, "rtn_loss": losses[0],
                      "awq_loss": min(losses)}
        if self.norm is not None:
            fold_into_norm(self.model.get_submodule(self.prefix + self.norm), s)
        return out


def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """norm(x) / s: divide the norm's affine weight and bias by s (Gemma's norm scales by 1 + w)."""
    gemma = "Gemma" in type(norm).__name__
    if gemma:
        norm.weight.data.copy_((1 + norm.weight.data.float()) / s - 1)
    else:
        norm.weight.data.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.div_(s.to(norm.bias.dtype))


class AWQLayer:
    """Per-linear handle for the layer-wise loop; the group does the work on the first compress()."""

    def __init__(self, group: AWQGroup, local: str, first: bool):
        self.group, self.local, self.first = group, local, first

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if self.first:  # the group's linears share one input: record it once
            self.group.add_batch(inp)

    def compress(self) -> dict[str, Any]:
        if self.group.results is None:
            self.group.results = self.group.run()
        return self.group.results[self.local]


def make_factory(model: nn.Module, cfg: AWQConfig):
    adapter = adapter_for(model)
    norms = {tuple(sorted(lin)): norm for norm, lin in adapter.norm_linear_pairs}
    groups: dict[str, AWQGroup] = {}

    def make(name: str, module: nn.Module) -> AWQLayer:
        prefix = name[: name.index(".", len(adapter.layers_path) + 1) + 1]
        local = name[len(prefix):]
        names = next(g for g in adapter.groups if local in g)
        key = prefix + "|".join(names)
        if key not in groups:
            groups[key] = AWQGroup(model, prefix, names, norms.get(tuple(sorted(names))), cfg)
        return AWQLayer(groups[key], local, local == names[0])

    return make


def check(lm, cfg: AWQConfig) -> None:
    adapter_for(lm.model)
    check_group_size({n: get_weight(m).shape[1] for n, m in iter_linears(lm.model)}, cfg.group_size)


def apply(lm, cfg: AWQConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    t0 = time.perf_counter()
    make = make_factory(lm.model, cfg)
    res = sequential(lm.model, calib, make, true_sequential=True, device=lm.device,
                     progress=getattr(ctx, "progress", None))
    alphas = [r["alpha"] for r in res.values()]
    folded = sum(1 for r in res.values() if "input_scale" not in r["stored"])
    return MethodReport(
        execution="simulated",
        storage={f"{n}.weight": r["stored"] for n, r in res.items()},
        details={
            "bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric, "clip": cfg.clip,
            "grid": cfg.grid, "search_rows": cfg.search_rows, "layers": len(res), "calibration": info,
            "alpha_mean": sum(alphas) / len(alphas), "alpha_min": min(alphas), "alpha_max": max(alphas),
            "scales_folded_into_norm": folded, "scales_stored_with_layer": len(res) - folded,
            "layers_with_input_scale": sorted(n for n, r in res.items() if "input_scale" in r["stored"]),
            "search_loss_rtn_sum": sum(r["rtn_loss"] for r in res.values()),
            "search_loss_awq_sum": sum(r["awq_loss"] for r in res.values()),
            "clip_shrunk_fraction_mean": sum(r["clip_shrunk"] for r in res.values()) / len(res),
            "seconds": time.perf_counter() - t0,
        },
        notes=["fake-quant: dequantized weights in a dense fp32 model",
               "scales folded into the preceding norm where one feeds the group; else stored as input_scale"],
    )


METHOD = Method(
    name="awq",
    family="quantization",
    description="AWQ: activation-aware per-channel scale search (+ clipping search), then group-wise quantization",
    config=AWQConfig,
    apply=apply,
    check=check,
    calibration_need="activation-statistics",
    test_params={"group_size": 32, "grid": 4},  # tiny models' 64 inputs reject the default g128
)
