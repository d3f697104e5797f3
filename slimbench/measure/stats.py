"""Error bars: standard errors, seeded bootstrap intervals, and paired deltas against a baseline.

Every accuracy a task reports carries its standard error and a bootstrap confidence interval,
and the task keeps its per-example scores (``details["per_example"]``) with example ids, so a
report can pair a compressed model's scores with the baseline's on the *same* examples:

- ``mean_stderr(x)``: sample standard deviation (ddof=1) / sqrt(n), as lm-evaluation-harness
  reports for ``acc`` (for 0/1 scores this is sqrt(p(1-p)/(n-1))).
- ``bootstrap_ci(x, statistic)``: percentile interval of ``statistic`` over ``n_resamples``
  resamples of the examples with replacement, from ``numpy.random.default_rng(seed)``; the same
  seed gives the same interval.
- ``paired_delta(x, base)``: mean of the per-example differences ``x - base``, its standard
  error, and a bootstrap interval that resamples the *pairs* (the same resampled examples for
  both models), so example difficulty cancels. ``within_noise`` is true when the interval
  contains 0: the difference is not distinguishable from sampling noise of the example set.

Worked example: a model right on 60 of 100 examples has acc 0.60, stderr
sqrt(0.6*0.4/99) = 0.0492. If a compressed model differs from it on 4 examples (one gained,
three lost), the paired delta is -0.02 with stderr 0.0141: a much tighter error than the
unpaired sqrt(2) * 0.049, because the other 96 examples agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Statistic = Callable[[np.ndarray], float]


def _array(x: Sequence[float] | np.ndarray, what: str = "scores") -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence, got shape {arr.shape}")
    return arr


def mean_stderr(x: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean (sample std with ddof=1 over sqrt(n)); nan for n < 2."""
    arr = _array(x)
    if arr.size < 2:
        return math.nan
    return float(arr.std(ddof=1) / math.sqrt(arr.size))


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    statistic: Statistic = np.mean,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (applied to a 1-D array), seeded."""
    arr = _array(x)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    stats = np.array([statistic(arr[row]) for row in idx])
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)


def summarize(
    x: Sequence[float] | np.ndarray,
    statistic: Statistic = np.mean,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Value, standard error (of the mean) and bootstrap interval of ``statistic``: a Metric's spread."""
    arr = _array(x)
    lo, hi = bootstrap_ci(arr, statistic, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "value": float(statistic(arr)),
        "stderr": mean_stderr(arr),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n": float(arr.size),
        "n_resamples": float(n_resamples),
        "seed": float(seed),
    }


def paired_delta(
    x: Sequence[float] | np.ndarray,
    base: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean of ``x - base`` over the same examples, with stderr and a paired bootstrap interval."""
    a, b = _array(x), _array(base, "baseline scores")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.size} vs {b.size} scores")
    diff = a - b
    lo, hi = bootstrap_ci(diff, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "delta": float(diff.mean()),
        "stderr": mean_stderr(diff),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n": int(diff.size),
        "within_noise": bool(lo <= 0.0 <= hi),
    }


def align(
    ids: Sequence[str], scores: Sequence[float], base_ids: Sequence[str], base_scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the examples both runs have, in the same order (refuses disjoint example sets)."""
    base = dict(zip(base_ids, base_scores, strict=True))
    common = [(s, base[i]) for i, s in zip(ids, scores, strict=True) if i in base]
    if not common:
        raise ValueError("no example ids in common: these runs did not score the same examples")
    a, b = zip(*common, strict=True)
    return np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)


def paired_delta_from_details(details: dict, base_details: dict, metric: str, **kw: Any) -> dict[str, Any]:
    """``paired_delta`` of one per-example metric between two records' ``task_details``.

    Both must hold ``per_example = {"id": [...], metric: [...]}`` (what the tasks of this
    package write); examples are matched by id, so a subset run still pairs correctly.
    """
    pe, pb = details.get("per_example") or {}, base_details.get("per_example") or {}
    for name, d in (("record", pe), ("baseline record", pb)):
        if metric not in d or "id" not in d:
            raise ValueError(f"the {name} has no per-example {metric!r} scores with ids (have: {sorted(d)})")
    a, b = align(pe["id"], pe[metric], pb["id"], pb[metric])
    return paired_delta(a, b, **kw)


def across_seeds(values: Sequence[float]) -> dict[str, float]:
    """Spread of one metric over runs that differ only in a seed (e.g. ``calib_seed``).

    Mean, sample standard deviation (ddof=1; what "13.52 +- 0.075 over 5 seeds" reports),
    min, max and the number of seeds. Seed noise is a property of the method, not of the
    example set: report it beside, not instead of, the per-example error bars.
    """
    arr = _array(values, "per-seed values")
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "seeds": float(arr.size),
    }
