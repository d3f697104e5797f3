"""`svd`: truncated SVD of every selected linear layer (no calibration data).

``W ~= U_k diag(s_k) V_k^T``, the best rank-k approximation of the weight in Frobenius norm
(Eckart-Young), but blind to which input directions the layer actually sees: LLM weights are
close to full rank, so at 20-40% parameters removed plain SVD loses much of what matters.
Each layer becomes two smaller nn.Linear (native: fewer parameters and FLOPs); save and
reload with methods.lowrank.factorize.save_factorized / load_factorized.
"""

from __future__ import annotations

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

from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight


class SVDConfig(LowRankConfig):
    pass


def check(lm, cfg: SVDConfig) -> None:
    check_ranks(select_linears(lm.model, cfg.targets), cfg)


def apply(lm, cfg: SVDConfig, ctx) -> MethodReport:
    layers = select_linears(lm.model, cfg.targets)
    shapes = {n: tuple(get_weight(m).shape) for n, m in layers.items()}
    if cfg.allocation == "sensitivity":
        spectra = {n: truncate_transformed(get_weight(m), None, None, None)[0] for n, m in layers.items()}
        ranks = sensitivity_ranks(spectra, shapes, cfg.ratio)
    else:
        ranks = uniform_ranks(shapes, cfg)
    discarded = []
    for name, mod in layers.items():
        s, left, right = truncate_transformed(get_weight(mod), None, None, ranks[name])
        discarded.append(float((s[ranks[name] :] ** 2).sum() / (s**2).sum()))
        replace_module(lm.model, name, build_factorized(mod, left, right))
    details = factorize_report(
        lm.model, ranks, shapes,
        {"allocation": cfg.allocation, "discarded_energy_mean": sum(discarded) / len(discarded),
         "discarded_energy_max": max(discarded)},
    )
    return MethodReport(execution="native", details=details, notes=["each linear replaced by two smaller linears"])


METHOD = Method(
    name="svd",
    family="lowrank",
    description="truncated SVD of each linear layer into two smaller linears (native); rank from ratio or explicit",
    config=SVDConfig,
    apply=apply,
    check=check,
)
