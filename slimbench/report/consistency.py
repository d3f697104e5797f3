"""A record against itself: every metric that can be recomputed from the record's own data.

Tasks keep their per-example scores (``task_details["per_example"]``) and raw samples so that
reports can pair runs; the same data lets anyone recompute the headline metrics. A metric whose
recorded value differs from its recomputation was edited (or written by a defective task): a
report must not give it a noise interval, and ``verify`` flags it.

What is recomputed (whatever a record holds of it):

- per-example ``nll`` (perplexity tasks): ``nll`` = mean, ``perplexity`` = exp(mean); the
  window count and ``window_nll``;
- per-example ``kl``, ``top1``: ``kl_to_exact_cache``, ``top1_agreement_exact_cache`` (means);
- per-example ``acc``, ``acc_norm``: their means;
- per-example ``loglikelihood`` with ``words`` (rolling perplexity): ``word_perplexity`` =
  exp(-sum ll / sum words), and with the details' ``bytes`` ``byte_perplexity`` and
  ``bits_per_byte``; without ``words``, a ``perplexity`` in ppl = exp(-mean ll) (last-word tasks);
- the number of examples against ``examples`` / ``windows``;
- timings: the inter-token latency percentiles from ``itl_samples_ms``, and a metric stated as
  the median of its samples (its spread has a ``median``) against those samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

RTOL = 1e-6


def _numbers(v: Any) -> np.ndarray | None:
    if not isinstance(v, list) or not v:
        return None
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        return None
    return np.asarray(v, dtype=np.float64)


def _per_example(details: dict[str, Any]) -> dict[str, np.ndarray]:
    pe = details.get("per_example")
    if not isinstance(pe, dict):
        return {}
    return {k: arr for k, v in pe.items() if k != "id" and (arr := _numbers(v)) is not None}


def recompute(rec: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """metric -> (value recomputed from the record's own data, from what), for the metrics present."""
    details = rec.get("task_details") if isinstance(rec.get("task_details"), dict) else {}
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    pe = _per_example(details)
    out: dict[str, tuple[float, str]] = {}

    def unit(name: str) -> str | None:
        m = metrics.get(name)
        return m.get("unit") if isinstance(m, dict) else None

    def add(name: str, value: Callable[[], float], how: str, units: tuple[str, ...] | None = None) -> None:
        if name in metrics and (units is None or unit(name) in units):
            out[name] = (float(value()), how)

    if "nll" in pe:
        nll = pe["nll"]
        add("nll", nll.mean, f"mean of {nll.size} per-example nll", ("nats/token",))
        add("perplexity", lambda: math.exp(nll.mean()), f"exp(mean of {nll.size} per-example nll)", ("ppl",))
    for key, name in (("kl", "kl_to_exact_cache"), ("top1", "top1_agreement_exact_cache")):
        if key in pe:
            add(name, pe[key].mean, f"mean of {pe[key].size} per-example {key}")
    for key in ("acc", "acc_norm"):
        if key in pe:
            add(key, pe[key].mean, f"mean of {pe[key].size} per-example {key}")
    if "loglikelihood" in pe:
        ll = pe["loglikelihood"]
        if "words" in pe and pe["words"].sum() > 0:
            words = pe["words"]
            add("word_perplexity", lambda: math.exp(-ll.sum() / words.sum()), "exp(-sum ll / sum words)")
            nbytes = details.get("bytes")
            if isinstance(nbytes, int | float) and nbytes > 0:
                add("byte_perplexity", lambda: math.exp(-ll.sum() / nbytes), "exp(-sum ll / bytes)")
                add("bits_per_byte", lambda: -ll.sum() / nbytes / math.log(2), "-sum ll / bytes / ln 2")
        else:
            add("perplexity", lambda: math.exp(-ll.mean()), f"exp(-mean of {ll.size} per-example ll)", ("ppl",))
    itl = _numbers(details.get("itl_samples_ms"))
    if itl is not None:
        for q in (50, 90, 99):
            add(f"itl_p{q}_ms", lambda q=q: np.percentile(itl, q), f"p{q} of {itl.size} inter-token latencies")
    for name, m in metrics.items():
        spread = m.get("spread") if isinstance(m, dict) else None
        samples = _numbers(m.get("samples")) if isinstance(m, dict) else None
        if name not in out and samples is not None and isinstance(spread, dict) and "median" in spread:
            out[name] = (float(np.median(samples)), f"median of its {samples.size} samples")
    return out


def counts(rec: dict[str, Any]) -> list[str]:
    """Example counts the details state that their per-example lists contradict."""
    details = rec.get("task_details") if isinstance(rec.get("task_details"), dict) else {}
    pe = details.get("per_example")
    ids = pe.get("id") if isinstance(pe, dict) else None
    if not isinstance(ids, list):
        return []
    out = []
    for key in ("windows", "examples", "documents"):
        n = details.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n != len(ids):
            out.append(f"task_details.{key} is {n}, but its per-example data holds {len(ids)} examples")
    lengths = {k: len(v) for k, v in pe.items() if isinstance(v, list)}
    if len(set(lengths.values())) > 1:
        out.append(f"per-example lists of different lengths: {lengths}")
    window = details.get("window_nll")
    if isinstance(window, list) and isinstance(pe.get("nll"), list) and window != pe["nll"]:
        out.append("task_details.window_nll differs from its per-example nll")
    return out


def mismatches(rec: dict[str, Any], rtol: float = RTOL) -> dict[str, str]:
    """metric -> why its recorded value contradicts the record's own data (empty: consistent)."""
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    out = {}
    for name, (value, how) in recompute(rec).items():
        got = metrics[name].get("value") if isinstance(metrics.get(name), dict) else None
        if not isinstance(got, int | float) or isinstance(got, bool):
            continue
        if not math.isclose(got, value, rel_tol=rtol, abs_tol=1e-9):
            out[name] = f"recorded {got:.6g}, but {how} gives {value:.6g}"
    return out
