"""The calibration-driven low-rank driver shared by asvd and svd-llm (no METHOD here).

A method supplies a ``Whitening``: which statistic of a layer's inputs it streams, and the
transform ``T`` (with its inverse) it derives from it. The layer's weight is factorized as
``SVD(W T)`` truncated to rank k, then ``T^{-1}`` is folded into the right factor, so the layer
still maps raw inputs. Statistics come from slimbench.layerwise.sequential, so every decoder
layer is calibrated on the outputs of the already-factorized layers before it. Within a layer
all linears see the layer's inputs in one pass (``true_sequential=False``): ASVD and SVD-LLM
take their statistics from the uncompressed layer, and one pass instead of one per linear
group makes calibration 2.5x cheaper (2 layer runs per layer instead of 5).

With ``allocation: sensitivity`` a first, spectrum-only pass (no layer changed) gives each
layer's transformed singular values on the dense model; ranks are then allocated globally
(factorize.sensitivity_ranks) and a second pass factorizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from slimbench.methods.lowrank.factorize import (
    LowRankConfig,
    build_factorized,
    check_ranks,
    factorize_report,
    replace_module,
    select_linears,
    sensitivity_ranks,
    truncate_transformed,
    uniform_ranks,
)
from torch import nn

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import sequential
from slimbench.method import MethodReport
from slimbench.modeling import get_weight, set_weight


class CalibratedLowRankConfig(LowRankConfig, CalibrationConfig):
    pass


class Whitening(Protocol):
    def new_state(self, n: int) -> dict[str, Any]: ...
    def accumulate(self, state: dict[str, Any], x: torch.Tensor) -> None: ...
    def transform(self, state: dict[str, Any]) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], dict]:
        """(T [n, n] float64, right -> right T^{-1}, what was done e.g. damping)."""


class _Skip:
    """For linears of a decoder layer that are not selected: see nothing, change nothing."""

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        pass

    def compress(self) -> None:
        return None


class Factorizer:
    """LayerCompressor: stream the whitening statistic, then factorize (or only report the spectrum).

    ``native=False`` writes the rank-k product into the dense weight instead of replacing the
    module by two smaller linears (a search scoring candidate plans on one model)."""

    def __init__(self, model: nn.Module, name: str, mod: nn.Module, whitening: Whitening, rank: int | None,
                 native: bool = True):
        self.model, self.name, self.mod, self.whitening, self.rank = model, name, mod, whitening, rank
        self.native = native
        self.state = whitening.new_state(get_weight(mod).shape[1])

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.whitening.accumulate(self.state, inp.detach())

    def compress(self) -> dict[str, Any]:
        w = get_weight(self.mod)
        t, undo, info = self.whitening.transform(self.state)
        s, left, right = truncate_transformed(w, t, undo, self.rank)
        if self.rank is None:
            return {"spectrum": s}
        if self.native:
            replace_module(self.model, self.name, build_factorized(self.mod, left, right))
        else:
            set_weight(self.mod, left @ right)
        # Energy of the discarded transformed singular values: for SVD-LLM this IS the layer's
        # squared output error on the calibration inputs.
        return {"discarded_energy": float((s[self.rank :] ** 2).sum() / (s**2).sum()), **info}


def run_pass(lm, calib: torch.Tensor, layers: dict[str, nn.Module], whitening: Whitening, ranks, progress) -> dict:
    def make(name: str, mod: nn.Module):
        if name not in layers:
            return _Skip()
        return Factorizer(lm.model, name, mod, whitening, None if ranks is None else ranks[name])

    out = sequential(lm.model, calib, make, true_sequential=False, device=lm.device, progress=progress)
    unseen = sorted(set(layers) - set(out))
    if unseen:
        raise ValueError(f"layers outside the layer-wise loop's groups cannot be calibrated: {unseen[:3]}")
    return {n: out[n] for n in layers}


def check(lm, cfg: LowRankConfig) -> None:
    check_ranks(select_linears(lm.model, cfg.targets), cfg)


def factorize_calibrated(lm, cfg: CalibratedLowRankConfig, ctx, whitening: Whitening, extra: dict) -> MethodReport:
    layers = select_linears(lm.model, cfg.targets)
    shapes = {n: tuple(get_weight(m).shape) for n, m in layers.items()}
    calib, info = sample_calibration(lm, cfg)
    progress = ctx.progress if ctx is not None else None
    if cfg.allocation == "sensitivity":
        spectra = {n: r["spectrum"] for n, r in run_pass(lm, calib, layers, whitening, None, progress).items()}
        ranks = sensitivity_ranks(spectra, shapes, cfg.ratio)
    else:
        ranks = uniform_ranks(shapes, cfg)
    results = run_pass(lm, calib, layers, whitening, ranks, progress)
    energies = [r["discarded_energy"] for r in results.values()]
    details = factorize_report(
        lm.model, ranks, shapes,
        {"allocation": cfg.allocation, "calibration": info, "discarded_energy_mean": sum(energies) / len(energies),
         "discarded_energy_max": max(energies), **extra},
    )
    details.update(_merge_info(results))
    return MethodReport(execution="native", details=details, notes=["each linear replaced by two smaller linears"])


def _merge_info(results: dict[str, dict]) -> dict[str, Any]:
    damped = {n: r["damping"] for n, r in results.items() if r.get("damping")}
    return {"damped_layers": damped} if damped or any("damping" in r for r in results.values()) else {}
