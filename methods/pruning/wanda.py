"""`wanda` (Sun et al., ICLR 2024): prune by |W| times the input channel's activation norm.

Score ``S[i, j] = |W[i, j]| · ‖X[:, j]‖₂`` over the calibration tokens, compared within each
output row (or within each N:M group); no weight update. Layers are pruned in order through
the shared layer-wise loop, each seeing the outputs of the already-pruned layers before it.
Like the authors' code, all linears of a decoder layer are scored from one forward pass of the
layer (``true_sequential: false``); ``true`` re-runs the layer after each group.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from slimbench.methods.pruning.common import pruning_report
from slimbench.methods.pruning.masks import SparsityConfig, build_mask, check_layerwise_pruning, layer_stats

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, set_weight


class WandaConfig(SparsityConfig, CalibrationConfig):
    true_sequential: bool = Field(False, description="re-run each layer after pruning each linear group")


def wanda_score(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ for a [out, in] weight and the per-input-channel sum of squares."""
    return w.abs().float() * sq_norm.sqrt().unsqueeze(0)


class WandaLayer:
    """Streams the squared L2 norm of each input channel, then prunes the layer."""

    def __init__(self, module: torch.nn.Module, cfg: WandaConfig):
        self.module, self.cfg = module, cfg
        self.sq_norm = torch.zeros(get_weight(module).shape[1], dtype=torch.float64)

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.sq_norm += inp.double().pow(2).sum(dim=0).cpu()

    def compress(self) -> dict[str, Any]:
        w = get_weight(self.module)
        keep = build_mask(wanda_score(w, self.sq_norm.float().to(w.device)), self.cfg.sparsity, self.cfg.nm, "row")
        set_weight(self.module, w * keep)
        return layer_stats(keep)


@torch.no_grad()
def apply(lm, cfg: WandaConfig, ctx) -> MethodReport:
    calib, info = sample_calibration(lm, cfg)
    make = lambda name, mod: WandaLayer(mod, cfg)
    stats = sequential(
        lm.model, calib, make, true_sequential=cfg.true_sequential, device=lm.device, progress=ctx.progress
    )
    notes = []
    if cfg.include_lm_head:
        notes.append("lm_head is outside the decoder layers and is left dense by the layer-wise loop")
    rep = pruning_report(lm, cfg, stats, {"calibration": info, "comparison_group": "nm_group" if cfg.nm else "row"})
    rep.notes += notes
    return rep



METHOD = Method(
    name="wanda",
    family="pruning",
    description="Wanda: |W|·‖X‖₂ per output row, no weight update; unstructured or N:M (simulated on CPU)",
    config=WandaConfig,
    apply=apply,
    check=check_layerwise_pruning,
    calibration_need="activation-statistics",
)
