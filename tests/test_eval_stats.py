"""Standard errors, bootstrap intervals and paired deltas, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimbench.measure import stats


def test_stderr_of_binary_scores_is_the_binomial_formula():
    x = [1.0] * 60 + [0.0] * 40
    assert stats.mean_stderr(x) == pytest.approx(math.sqrt(0.6 * 0.4 / 99))
    assert math.isnan(stats.mean_stderr([1.0]))


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=400)
    a = stats.bootstrap_ci(x, seed=7)
    assert a == stats.bootstrap_ci(x, seed=7)
    assert a != stats.bootstrap_ci(x, seed=8)
    lo, hi = a
    assert lo < x.mean() < hi
    # the percentile interval of the mean is about mean +- 1.96 stderr for a normal sample
    half = 1.96 * stats.mean_stderr(x)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_summarize_carries_value_stderr_and_interval():
    s = stats.summarize([0.0, 1.0, 1.0, 1.0], seed=0)
    assert s["value"] == 0.75 and s["n"] == 4.0
    assert s["ci_low"] <= 0.75 <= s["ci_high"]


def test_paired_delta_is_tighter_than_unpaired_when_examples_agree():
    base = np.array([1.0] * 60 + [0.0] * 40)
    x = base.copy()
    x[:3] = 0.0  # three lost
    x[60] = 1.0  # one gained
    d = stats.paired_delta(x, base, seed=0)
    assert d["delta"] == pytest.approx(-0.02)
    diff = x - base
    assert d["stderr"] == pytest.approx(diff.std(ddof=1) / 10)
    assert d["stderr"] < math.sqrt(2) * stats.mean_stderr(base) / 2
    assert d["within_noise"] == (d["ci_low"] <= 0 <= d["ci_high"])


def test_a_clear_difference_is_not_within_noise():
    base = np.ones(200)
    x = np.ones(200)
    x[:60] = 0
    d = stats.paired_delta(x, base)
    assert d["delta"] == pytest.approx(-0.3) and not d["within_noise"] and d["ci_high"] < 0


def test_paired_delta_from_details_matches_by_id():
    rec = {"per_example": {"id": ["a", "b", "c"], "acc": [1.0, 0.0, 1.0]}}
    base = {"per_example": {"id": ["c", "a", "b", "d"], "acc": [0.0, 1.0, 1.0, 1.0]}}
    d = stats.paired_delta_from_details(rec, base, "acc")
    assert d["n"] == 3 and d["delta"] == pytest.approx((0 - 1 + 1) / 3)
    with pytest.raises(ValueError, match="no per-example 'acc_norm'"):
        stats.paired_delta_from_details(rec, base, "acc_norm")
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_delta([1.0, 0.0], [1.0])


def test_across_seeds_reports_sample_std():
    s = stats.across_seeds([13.45, 13.52, 13.60])
    assert s["mean"] == pytest.approx(13.5233333)
    assert s["std"] == pytest.approx(np.std([13.45, 13.52, 13.60], ddof=1))
    assert (s["min"], s["max"], s["seeds"]) == (13.45, 13.60, 3.0)
