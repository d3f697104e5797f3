"""Allocation under a byte budget (multiple-choice knapsack), Pareto fronts and hypervolume.

``allocate`` picks one option per unit minimising the summed loss with the summed bytes within
the budget: a dynamic programme over bytes above each unit's cheapest option, in
``resolution`` steps with every option's cost rounded *up* (so the true bytes never exceed
the budget), then a greedy pass that spends what the rounding left on the best remaining
upgrades. Exact for the additive model up to that rounding (at the default resolution the
rounding can leave at most units/resolution of the budget unused, before the greedy pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Option = tuple[str, int, float]  # (choice key, bytes, loss)


class BudgetError(ValueError):
    pass


def allocate(options: dict[str, Sequence[Option]], budget: int, resolution: int = 100_000) -> dict[str, str]:
    """``{unit: key}`` minimising the summed loss with summed bytes <= ``budget``."""
    units = list(options)
    if any(not options[u] for u in units):
        raise BudgetError(f"unit {next(u for u in units if not options[u])} has no option")
    floor = {u: min(b for _, b, _ in options[u]) for u in units}
    base = sum(floor.values())
    if base > budget:
        raise BudgetError(f"the budget ({budget:,} bytes) is below the smallest configuration ({base:,} bytes)")
    extra = budget - base
    step = max(1, math.ceil(extra / resolution))
    cap = extra // step
    best = np.full(cap + 1, np.inf)
    best[0:] = 0.0  # no unit yet: zero loss at any spend
    picks = np.zeros((len(units), cap + 1), dtype=np.int16)
    for i, u in enumerate(units):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (_, b, loss) in enumerate(options[u]):
            c = math.ceil((b - floor[u]) / step)
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[: cap + 1 - c] + loss
            better = cand < new
            new[better], pick[better] = cand[better], j
        best, picks[i] = new, pick
    if not np.isfinite(best[cap]):
        raise BudgetError("no combination of options fits the budget")
    chosen: dict[str, int] = {}
    k = cap
    for i in range(len(units) - 1, -1, -1):
        j = int(picks[i, k])
        chosen[units[i]] = j
        k -= math.ceil((options[units[i]][j][1] - floor[units[i]]) / step)
    return {u: options[u][j][0] for u, j in fill_greedy(options, chosen, budget).items()}


def fill_greedy(options: dict[str, Sequence[Option]], chosen: dict[str, int], budget: int) -> dict[str, int]:
    """Spend the bytes left on upgrades, the largest loss decrease per byte first."""
    chosen = dict(chosen)
    spent = sum(options[u][j][1] for u, j in chosen.items())
    while True:
        best, best_gain = None, 0.0
        for u, j in chosen.items():
            _, b0, l0 = options[u][j]
            for k, (_, b, loss) in enumerate(options[u]):
                if loss < l0 and spent - b0 + b <= budget:
                    gain = (l0 - loss) / max(b - b0, 1)
                    if gain > best_gain:
                        best, best_gain = (u, k), gain
        if best is None:
            return chosen
        u, k = best
        spent += options[u][k][1] - options[u][chosen[u]][1]
        chosen[u] = k


# -- Pareto fronts and hypervolume (both objectives minimised) ----------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points, sorted by x (a point equal to another is kept once)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` and bounded by the reference point ``ref`` (both minimised).

    Points not better than ``ref`` in both coordinates add nothing. The union of the rectangles
    [x, ref_x] x [y, ref_y], computed as a sum of vertical slabs over the sorted front.
    """
    front = [(x, y) for x, y in pareto_front(points) if x < ref[0] and y < ref[1]]
    area = 0.0
    for i, (x, y) in enumerate(front):
        x_next = front[i + 1][0] if i + 1 < len(front) else ref[0]
        area += (x_next - x) * (ref[1] - y)
    return area


def dominates_front(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], x_tol: float = 0.0) -> bool:
    """Every point of ``b`` is weakly dominated by some point of ``a``; ``x_tol``: a relative
    slack on the first coordinate (stored bytes counted as equal within it)."""
    return all(any(xa <= xb * (1 + x_tol) and ya <= yb for xa, ya in a) for xb, yb in b)
