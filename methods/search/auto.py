"""`auto`: per-layer settings chosen under a budget from a sensitivity profile, verified end to end.

1. **Profile** (``slimbench.methods.search.sensitivity``): for every linear of the decoder layers (or every
   decoder layer, ``unit: layer``) and every candidate setting of the family, the KL to the
   uncompressed model on calibration windows and the NLL change on validation windows when that
   unit alone is compressed. Cached on disk and shared by every search on the same model.
2. **Allocate** (``allocate.allocate``): minimise the summed loss under the byte budget, one
   plan per objective (``kl``: the calibration KL; ``val``: the validation NLL change), with
   ``floors`` the same allocation without the choices cheaper than each floor below the
   budget, plus the uniform setting with the lowest predicted loss that fits (``include_uniform``).
3. **Verify**: apply each plan to the model and measure its NLL on ``verify_windows``
   validation windows; keep the best. The summed single-unit losses ignore interactions
   between units, which the end-to-end check catches.
4. **Apply** the chosen plan; the record's method report holds it as an explicit
   ``{linear: choice}`` map, and ``{name: auto, plan: {...}}`` re-applies exactly that plan
   without searching.

Budgets (one of): ``budget_bits`` (effective bits over the decoder linears, counted as the
harness counts them: codes, scales and zero-points, or bitmask and values), ``budget_bytes``
(the whole stored checkpoint: the fixed part and a conservative allowance for the
safetensors header are taken off first), or ``budget_like`` (the linear bytes a uniform choice
would store, e.g. ``rtn:3:g64``: "at equal stored bytes"). Without one: 4 bits (quantization),
``wanda:0.5`` (pruning) or ``svd-llm:0.2`` (low-rank). A decode-latency budget is not offered:
fake-quant and masked plans run at dense speed whatever they are, and for the plans whose speed
does depend on them (``format: packed``, low-rank) no per-linear latency model is built yet.

Choices (``methods/search/choices.py``): ``rtn:B:pc|gG`` for the quantization family,
``magnitude:S`` / ``wanda:S`` for pruning, ``svd-llm:R`` (a per-linear rank, as the fraction R of
its parameters removed) for low-rank, ``dense`` (sparsity or ratio 0). Low-rank plans execute
natively (factorized linears), pruning plans simulated (masks), quantization plans as ``format``
says. The test split is never touched here: the profile uses the calibration and validation
splits, the verification the validation split.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from slimbench.methods.lowrank.calibrated import Factorizer
from slimbench.methods.lowrank.factorize import rank_for_ratio
from slimbench.methods.lowrank.svd_llm import CholeskyWhitening
from slimbench.methods.pruning.masks import build_mask, layer_stats, summarize_layers
from slimbench.methods.pruning.sparse_format import sparse_storage
from slimbench.methods.pruning.wanda import WandaConfig, WandaLayer
from slimbench.methods.quantization.grid import GridConfig, quantize_matrix
from slimbench.methods.quantization.packed import FormatConfig, finish_layer, format_report
from slimbench.methods.search.allocate import BudgetError
from slimbench.methods.search.choices import (
    CALIBRATED,
    SVD_LLM_DAMPING,
    Choice,
    compress_weight,
    is_transposed,
    parse_choice,
    stored_nbytes,
)
from slimbench.methods.search.plans import candidate_plans, expand, summarize_plan, unit_options
from slimbench.methods.search.sensitivity import ProbeConfig, sensitivity_profile, units_of

from slimbench.calibration import CalibrationConfig, sample_calibration
from slimbench.layerwise import adapter_for, sequential
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, serialized_bytes, set_weight, unique_tensors

BUDGETS = ("budget_bits", "budget_bytes", "budget_like")
HEADER_ALLOWANCE = 200  # bytes of safetensors header per stored tensor (real entries are ~120)


class AutoConfig(CalibrationConfig, ProbeConfig, FormatConfig):
    family: Literal["quantization", "pruning", "lowrank"] = Field(
        "quantization", description="which methods' settings to mix"
    )
    bits: list[int] = Field([2, 3, 4, 5, 6, 8], description="quantization: candidate bit widths (RTN)")
    group_sizes: list[int | None] = Field([None, 64], description="quantization: candidate groups (null = per channel)")
    symmetric: bool = Field(False, description="quantization: symmetric grids")
    prune_methods: list[Literal["magnitude", "wanda"]] = Field(
        ["magnitude", "wanda"], description="pruning: candidate methods"
    )
    sparsities: list[float] = Field(
        [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], description="pruning: candidate sparsities (dense is always a choice)"
    )
    ratios: list[float] = Field(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        description="lowrank: candidate fractions of a linear's parameters removed by SVD-LLM (dense is a choice)",
    )
    budget_bits: float | None = Field(None, gt=0, description="budget: effective bits per decoder-linear weight")
    budget_bytes: int | None = Field(None, gt=0, description="budget: bytes of the whole stored checkpoint")
    budget_like: str | None = Field(None, description="budget: the linear bytes of a uniform choice, e.g. rtn:3:g64")
    allow_dense: bool | None = Field(
        None, description="may a linear stay uncompressed; null = yes for pruning (sparsity 0), no for quantization"
    )
    objectives: list[Literal["kl", "val"]] = Field(["kl", "val"], description="losses a plan is allocated on")
    include_uniform: bool = Field(True, description="also verify the best-predicted uniform choice that fits")
    floors: bool = Field(
        True,
        description="also allocate without the choices cheaper than each candidate below the budget, "
        "and let the end-to-end check pick (summed single-unit losses under-rate far-below-budget choices)",
    )
    verify_windows: int = Field(32, ge=1, le=4096, description="validation windows of the end-to-end check")
    verify_seqlen: int = Field(256, ge=8, le=8192, description="tokens per verification window")
    plan: dict[str, str] | None = Field(None, description="explicit {linear: choice}: apply it, no search")

    @classmethod
    def label_keys(cls, params: dict) -> tuple[str, ...]:
        """The family and the budget: a plot's reader needs them; the candidate lists are the search space."""
        return ("family", *BUDGETS)

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        """No budget and no plan: 4 effective bits (quantization) or Wanda 50%'s bytes (pruning)."""
        if isinstance(data, dict) and not any(data.get(k) is not None for k in (*BUDGETS, "plan")):
            default = {"pruning": {"budget_like": "wanda:0.5"}, "lowrank": {"budget_like": "svd-llm:0.2"}}
            return {**data, **default.get(data.get("family"), {"budget_bits": 4.0})}
        return data

    @model_validator(mode="after")
    def _one_budget(self):
        given = [b for b in BUDGETS if getattr(self, b) is not None]
        if self.plan is None and len(given) != 1:
            raise ValueError("give exactly one of budget_bits, budget_bytes, budget_like (or an explicit plan); "
                             f"got {given or 'none'}")
        if self.budget_like is not None and self.plan is None:
            like = parse_choice(self.budget_like).key
            if like not in [*self.candidate_keys(), "dense"]:
                raise ValueError(f"budget_like {like} is not among the candidates {self.candidate_keys()}")
        for key in (self.plan or {}).values():
            parse_choice(key)
        if self.format == "packed" and self.family != "quantization":
            raise ValueError("format 'packed' is a quantization format; pruning plans are stored sparse")
        if "val" in self.objectives and self.plan is None and self.val_windows == 0:
            raise ValueError("objective 'val' needs val_windows > 0")
        if any(not 0 < s < 1 for s in self.sparsities):
            raise ValueError(f"sparsities must lie in (0, 1) (dense is always a choice); got {self.sparsities}")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios must lie in (0, 1) (dense is always a choice); got {self.ratios}")
        return self

    @property
    def dense_allowed(self) -> bool:
        return self.family != "quantization" if self.allow_dense is None else self.allow_dense

    def candidate_keys(self) -> list[str]:
        if self.family == "quantization":
            return [Choice("rtn", bits=b, group_size=g).key for b in self.bits for g in self.group_sizes]
        if self.family == "lowrank":
            return [Choice("svd-llm", ratio=r).key for r in self.ratios]
        return [Choice(m, sparsity=s).key for m in self.prune_methods for s in self.sparsities]


# -- checks ------------------------------------------------------------------------------------
def check(lm, cfg: AutoConfig) -> None:
    adapter_for(lm.model)  # the profile and Wanda run decoder layer by decoder layer
    if cfg.plan is None:
        return
    names = {n for n, _ in iter_linears(lm.model)}
    unknown = sorted(set(cfg.plan) - names)
    if unknown:
        raise ValueError(f"plan names linears the model lacks: {unknown[:3]} ({len(unknown)} in all)")
    for name, key in cfg.plan.items():
        ch = parse_choice(key)
        w = get_weight(lm.model.get_submodule(name))
        if not ch.applicable(w.shape[1]):
            raise ValueError(f"plan: {key} does not fit {name} ({w.shape[1]} input channels)")


# -- applying a plan ---------------------------------------------------------------------------
class _Untouched:
    """A layer-wise compressor for linears a Wanda pass must leave alone."""

    def add_batch(self, inp, out) -> None:
        pass

    def compress(self) -> None:
        return None


def apply_plan(lm, plan: dict[str, Choice], cfg: AutoConfig, calib: torch.Tensor | None, fmt: str = "fake",
               native: bool = True):
    """Compress every linear as the plan says; (storage, per-linear stats).

    ``native=False`` leaves SVD-LLM's products in the dense weights instead of factorized layers
    (the end-to-end check scores several plans on one model, restoring its weights between)."""
    model = lm.model
    storage: dict[str, dict[str, torch.Tensor]] = {}
    stats: dict[str, dict[str, Any]] = {}
    pruned: list[str] = []
    for name, ch in plan.items():
        mod = model.get_submodule(name)
        if ch.method == "rtn":
            w = get_weight(mod)
            grid = GridConfig(bits=ch.bits, group_size=ch.group_size, symmetric=cfg.symmetric)
            codes, _, params = quantize_matrix(w, grid)
            stored = finish_layer(model, name, codes.view_as(w), params, ch.group_size, fmt)
            if stored is not None:
                storage[f"{name}.weight"] = stored
        elif ch.method == "magnitude":
            w = get_weight(mod)
            keep = build_mask(w.abs(), ch.sparsity, None, "layer")
            set_weight(mod, w * keep)
            stats[name] = layer_stats(keep)
            pruned.append(name)
    wanda = {n: ch for n, ch in plan.items() if ch.method == "wanda"}
    if wanda:  # after magnitude: Wanda calibrates on the outputs of the already-pruned layers
        make = lambda n, m: WandaLayer(m, WandaConfig(sparsity=wanda[n].sparsity)) if n in wanda else _Untouched()
        for n, st in sequential(model, calib, make, true_sequential=False, device=lm.device).items():
            if st is not None:
                stats[n] = st
                pruned.append(n)
    if pruned:
        storage.update(sparse_storage(model, pruned, None))
    lowrank = {n: ch for n, ch in plan.items() if ch.method == "svd-llm"}
    ranks = {n: rank_for_ratio(*get_weight(model.get_submodule(n)).shape, ch.ratio) for n, ch in lowrank.items()}
    if lowrank:  # last, as `svd-llm` does: each layer whitened by the inputs the factorized ones before it give
        def make(n, m):
            if n not in lowrank:
                return _Untouched()
            return Factorizer(model, n, m, CholeskyWhitening(SVD_LLM_DAMPING), ranks[n], native=native)

        for n, st in sequential(model, calib, make, true_sequential=False, device=lm.device).items():
            if st is not None:
                stats[n] = {"rank": ranks[n], **st}
    return storage, stats


# -- the search --------------------------------------------------------------------------------
def activation_norms(lm, calib: torch.Tensor, *, gram: bool = False) -> dict[str, torch.Tensor]:
    """Per linear, from the uncompressed model over the calibration tokens, float64: the sum of
    squares of each input channel (Wanda's statistic), or with ``gram`` the whole ``X^T X``
    (SVD-LLM's)."""
    norms: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            norms[name] = norms.get(name, 0) + (x.T @ x if gram else x.pow(2).sum(0)).cpu()

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in iter_linears(lm.model)]
    try:
        with torch.no_grad():
            for sample in calib:
                lm.model(input_ids=sample.unsqueeze(0).to(lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return norms


def profile_for(lm, cfg: AutoConfig, calib_fn, ctx) -> dict[str, Any]:
    mods = dict(iter_linears(lm.model))
    norms: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    uses_calib = bool(CALIBRATED & {parse_choice(k).method for k in cfg.candidate_keys()})

    def compress(name: str, w: torch.Tensor, key: str):
        ch = parse_choice(key)
        if not ch.applicable(w.shape[1]):
            return None
        w_hat, stored = compress_weight(w, ch, symmetric=cfg.symmetric, sq_norm=norms.get(name),
                                        xtx=grams.get(name), transposed=is_transposed(mods[name]))
        return w_hat, (w.numel() * w.element_size() if stored is None else stored_nbytes(stored))

    extra: dict[str, Any] = {"symmetric": cfg.symmetric}
    if uses_calib:  # Wanda's masks, SVD-LLM's whitening depend on the calibration sample: part of the key
        extra["calibration"] = {k: getattr(cfg, k) for k in CalibrationConfig.model_fields}
    probe = ProbeConfig(**{k: getattr(cfg, k) for k in ProbeConfig.model_fields})

    def prepare(todo: set[str]) -> None:  # the statistics, from the intact model, only if needed
        methods = {parse_choice(k).method for k in todo}
        if "wanda" in methods:
            norms.update(activation_norms(lm, calib_fn()[0]))
        if "svd-llm" in methods:
            grams.update(activation_norms(lm, calib_fn()[0], gram=True))

    return sensitivity_profile(lm, family=cfg.family, candidates=cfg.candidate_keys(), compress=compress,
                               probe=probe, corpus=cfg.calib_corpus, key_extra=extra, progress=ctx.progress,
                               prepare=prepare)


def linear_budget(lm, cfg: AutoConfig, prof: dict[str, Any], units: dict[str, list[str]]) -> int:
    """Bytes the decoder linears may take, from whichever budget the config gives."""
    mods = dict(iter_linears(lm.model))
    numel = sum(get_weight(mods[n]).numel() for names in units.values() for n in names)
    if cfg.budget_bits is not None:
        return math.floor(cfg.budget_bits * numel / 8)
    if cfg.budget_like is not None:
        key = parse_choice(cfg.budget_like).key
        total = 0
        for u, names in units.items():
            e = prof["units"][u]["candidates"]
            if key == "dense":
                total += sum(get_weight(mods[n]).numel() * get_weight(mods[n]).element_size() for n in names)
            elif key not in e:
                raise BudgetError(f"budget_like {key}: not a candidate measured for {u} (add it to the candidates)")
            else:
                total += e[key]["bytes"]
        return total
    linear_keys = {f"{n}.weight" for names in units.values() for n in names}
    fixed = {k: t for k, t in unique_tensors(lm.model).items() if k not in linear_keys}
    allowance = HEADER_ALLOWANCE * 5 * len(linear_keys)  # up to 5 stored tensors per linear
    budget = cfg.budget_bytes - serialized_bytes(fixed) - allowance
    if budget <= 0:
        raise BudgetError(f"budget_bytes {cfg.budget_bytes:,} does not even hold the uncompressed non-linear "
                          f"tensors ({serialized_bytes(fixed):,} bytes)")
    return budget


@torch.no_grad()
def verify(lm, plans: dict[str, dict[str, str]], cfg: AutoConfig, calib_fn, progress=None) -> dict[str, float]:
    """Validation NLL of each plan applied to the model (restored after each). A calibrated plan
    costs a whole layer-wise pass (minutes on a real model), hence the progress bar."""
    from slimbench.tasks.perplexity import JOIN, windows

    from slimbench.zoo.corpora import encode_split

    win = windows(encode_split(lm, cfg.calib_corpus, "validation", JOIN), cfg.verify_seqlen, cfg.verify_windows)
    mods = dict(iter_linears(lm.model))
    originals = {n: get_weight(m).clone() for n, m in mods.items()}
    out: dict[str, float] = {}
    bar = progress(total=len(plans), desc="verify plans", unit="plan") if progress else None
    for name, plan in plans.items():
        choices = {n: parse_choice(k) for n, k in plan.items()}
        calib = calib_fn()[0] if any(c.method in CALIBRATED for c in choices.values()) else None
        try:
            apply_plan(lm, choices, cfg, calib, native=False)
            out[name] = float(torch.cat([lm.token_nll(b.unsqueeze(0)).double().mean(1) for b in win]).mean())
        finally:
            for n, w in originals.items():
                set_weight(mods[n], w)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def search(lm, cfg: AutoConfig, calib_fn, ctx) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """Profile, allocate, verify: (the chosen {linear: key}, what the record keeps, notes)."""
    adapter = adapter_for(lm.model)
    mods = dict(iter_linears(lm.model))
    units = units_of(lm.model, adapter.layers_path, cfg.unit)
    numel = sum(get_weight(mods[n]).numel() for names in units.values() for n in names)
    prof = profile_for(lm, cfg, calib_fn, ctx)
    dense = {u: sum(get_weight(mods[n]).numel() * get_weight(mods[n]).element_size() for n in names)
             for u, names in units.items()} if cfg.dense_allowed else None
    options = {o: unit_options(prof, o, dense, cfg.candidate_keys()) for o in ("kl", "val")}
    budget = linear_budget(lm, cfg, prof, units)
    plans = candidate_plans(options, cfg, budget)
    val = verify(lm, {k: expand(p, units) for k, p in plans.items()}, cfg, calib_fn, ctx.progress)
    chosen = min(val, key=val.get)
    table = {o: {u: {k: (b, loss) for k, b, loss in v} for u, v in options[o].items()} for o in options}
    details = {
        "budget_linear_bytes": budget,
        "budget_effective_bits": 8 * budget / numel,
        "chosen": chosen,
        "verify_val_nll": val,
        "predicted_loss_sum": {k: {o: sum(table[o][u][key][1] for u, key in p.items()) for o in table}
                               for k, p in plans.items()},
        "plan_bytes": {k: sum(table["kl"][u][key][0] for u, key in p.items()) for k, p in plans.items()},
        "profile": {"path": prof["meta"]["path"], "seconds": prof["meta"].get("seconds"), "units": len(units),
                    "unit": cfg.unit, "candidates": cfg.candidate_keys(), "dense_allowed": cfg.dense_allowed,
                    "reference_val_nll": prof["meta"].get("reference_val_nll")},
        "verify": {"split": "validation", "windows": cfg.verify_windows, "seqlen": cfg.verify_seqlen},
    }
    notes = []
    if chosen.startswith("uniform:"):
        notes.append(f"the end-to-end check preferred the uniform {chosen.split(':', 1)[1]} to every searched plan")
    return expand(plans[chosen], units), details, notes


def apply(lm, cfg: AutoConfig, ctx) -> MethodReport:
    cache: dict[str, Any] = {}

    def calib_fn():  # drawn once, only if a calibrated choice needs it
        if "calib" not in cache:
            cache["calib"] = sample_calibration(lm, cfg)
        return cache["calib"]

    if cfg.plan is not None:
        plan, search_details, notes = dict(cfg.plan), None, ["explicit plan applied (no search)"]
    else:
        plan, search_details, notes = search(lm, cfg, calib_fn, ctx)
    numel = {n: get_weight(m).numel() for n, m in iter_linears(lm.model)}
    choices = {n: parse_choice(k) for n, k in plan.items()}
    calib = calib_fn()[0] if any(c.method in CALIBRATED for c in choices.values()) else None
    storage, stats = apply_plan(lm, choices, cfg, calib, cfg.format)
    details: dict[str, Any] = {"family": cfg.family, "search": search_details}
    details["plan"] = {n: choices[n].key for n in plan}  # re-run with {name: auto, plan: <this>}
    details["plan_summary"] = summarize_plan(details["plan"], numel)
    factorized = {n: st for n, st in stats.items() if choices[n].method == "svd-llm"}
    pruned = {n: st for n, st in stats.items() if n not in factorized}
    if pruned:
        details.update(summarize_layers(pruned))
    if factorized:
        details["ranks"] = {n: st["rank"] for n, st in factorized.items()}
        kept = sum(sum(p.numel() for p in lm.model.get_submodule(n).parameters() if p.dim() == 2) for n in numel)
        details["weight_params_removed"] = 1.0 - kept / sum(numel.values())  # measured on the model
        details["discarded_energy_max"] = max(st["discarded_energy"] for st in factorized.values())
        damped = {n: st["damping"] for n, st in factorized.items() if st.get("damping")}
        if damped:
            details["damped_layers"] = damped
    if calib is not None:
        details["calibration"] = calib_fn()[1]
    if any(c.method == "rtn" for c in choices.values()):
        execution, fmt_notes, fmt = format_report(lm.model, cfg.format)
        notes += fmt_notes
        details.update(fmt)
    elif factorized and not pruned:
        execution = "native"
        notes.append("each svd-llm linear replaced by two smaller linears")
    else:
        execution = "simulated"
        if pruned:
            notes.append("masks in a dense model (unstructured zeros); stored in the sparse format")
    return MethodReport(execution=execution, storage=storage, details=details, notes=notes)


METHOD = Method(
    name="auto",
    family="search",
    version="2",  # 2: floored plans, 32 verification windows
    description="per-layer settings (RTN bits/groups, magnitude/Wanda sparsity, or SVD-LLM rank) allocated under a "
    "bytes/bits budget from a cached sensitivity profile, verified on validation text; re-runnable from its plan",
    config=AutoConfig,
    apply=apply,
    check=check,
    calibration_need="activation-statistics",  # Wanda choices: per-channel input norms
    # The contract checks behaviour, not search quality: few candidates and tiny probes.
    test_params={"bits": [2, 4], "group_sizes": [32], "budget_bits": 3.5, "objectives": ["kl"], "probe_windows": 2,
                 "probe_seqlen": 32, "val_windows": 1, "verify_windows": 2, "verify_seqlen": 32},
)
