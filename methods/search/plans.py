"""The plans a search weighs: per-unit options from the profile, and the candidate allocations.

A *unit* is a linear (or a decoder layer); its *options* are ``(choice key, bytes, loss)`` of
the settings measured for it. ``candidate_plans`` turns options and a byte budget into the
allocations that ``auto`` verifies end to end on validation text.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from slimbench.methods.search.allocate import BudgetError, allocate


def unit_options(prof: dict[str, Any], objective: str, dense_bytes: dict[str, int] | None,
                 keys: list[str]) -> dict[str, list]:
    """Per unit, (choice, bytes, loss) of the measured candidates in ``keys``, and ``dense`` if given."""
    loss_key = "kl" if objective == "kl" else "val_nll_delta"
    out = {}
    for u, e in prof["units"].items():
        opts = [(k, v["bytes"], v[loss_key]) for k, v in e["candidates"].items() if k in keys]
        if dense_bytes is not None:
            opts.append(("dense", dense_bytes[u], 0.0))
        out[u] = opts
    return out


def expand(unit_plan: dict[str, str], units: dict[str, list[str]]) -> dict[str, str]:
    return {n: key for u, key in unit_plan.items() for n in units[u]}


def choice_rates(options: dict[str, list]) -> dict[str, float]:
    """Per choice key, its bytes over all units that offer it divided by those units' largest
    option's bytes: where the choice lies from cheapest to costliest."""
    num: dict[str, int] = {}
    den: dict[str, int] = {}
    for opts in options.values():
        top = max(b for _, b, _ in opts)
        for key, b, _ in opts:
            num[key] = num.get(key, 0) + b
            den[key] = den.get(key, 0) + top
    return {k: num[k] / den[k] for k in num}


def floored_plans(options: dict[str, list], budget: int, tag: str) -> dict[str, dict[str, str]]:
    """Allocations that may not use choices cheaper than a floor, one per floor between the
    cheapest choice and the budget.

    Why: the allocation adds single-unit losses, and the units' errors interact: choices far
    below the budget (2-bit linears in a 3-bit budget, 80% sparse layers in a 50% one) carry
    large errors that compound, so the additive optimum leans on them more than is good. The
    floored plans are the same optimisation with those choices removed; the end-to-end check
    decides between them on validation text.
    """
    rates = choice_rates(options)
    total = sum(max(b for _, b, _ in opts) for opts in options.values())
    plans: dict[str, dict[str, str]] = {}
    for floor in sorted((k for k in rates if min(rates.values()) < rates[k] <= budget / total), key=rates.get):
        kept = {u: [o for o in opts if rates[o[0]] >= rates[floor]] for u, opts in options.items()}
        try:
            plans[f"{tag}:floor={floor}"] = allocate(kept, budget)
        except BudgetError:  # this floor already exceeds the budget somewhere
            continue
    return plans


def candidate_plans(options: dict[str, dict[str, list]], cfg, budget: int) -> dict[str, dict[str, str]]:
    """Name -> {unit: key}: one allocation per objective (and per floor, with ``floors``), and
    the best-predicted fitting uniform choice; a plan equal to one already listed is dropped.

    ``cfg``: the search's config (``objectives``, ``floors``, ``include_uniform``, ``candidate_keys()``)."""
    plans: dict[str, dict[str, str]] = {}
    for obj in cfg.objectives:
        found = {f"search:{obj}": allocate(options[obj], budget)}
        if cfg.floors:
            found |= floored_plans(options[obj], budget, f"search:{obj}")
        for name, plan in found.items():
            if plan not in plans.values():
                plans[name] = plan
    if cfg.include_uniform:
        best = None
        for key in cfg.candidate_keys():
            rows = [next((o for o in opts if o[0] == key), None) for opts in options["kl"].values()]
            if None in rows or sum(r[1] for r in rows) > budget:
                continue  # not measured for every unit, or over the budget
            loss = sum(r[2] for r in rows)
            if best is None or loss < best[1]:
                best = (key, loss)
        if best is not None:
            uniform = dict.fromkeys(options["kl"], best[0])
            plans = {k: p for k, p in plans.items() if p != uniform} | {f"uniform:{best[0]}": uniform}
    return plans


def summarize_plan(plan: dict[str, str], numel: dict[str, int]) -> dict[str, Any]:
    """Counts of each choice, and the share of decoder-linear weights each covers."""
    total = sum(numel.values())
    counts = Counter(plan.values())
    share = Counter()
    for n, k in plan.items():
        share[k] += numel[n] / total
    return {k: {"linears": counts[k], "weight_share": round(share[k], 4)} for k in sorted(counts)}
