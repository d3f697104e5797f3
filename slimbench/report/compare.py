"""Two result sets side by side: only like with like, each delta with its noise.

Two cells are comparable when they have the same model (name and revision), the same method
config and version (every step's name, parameters, version and plugin provider), the same
task (name, version, parameters) and the same hardware class (device, dtype, threads and the
processor's name). Everything else is listed as only in A, only in B, or "not comparable"
with the fields that differ, never silently matched.

For each metric both cells have, the delta B - A comes with its noise:

- the paired bootstrap where both records keep per-example scores (``task_details
  ["per_example"]``; the task's paired metric, e.g. per-window NLL for perplexity): the two
  runs are paired example by example (slimbench.measure.stats.paired_delta_from_details);
- else the spread of repeats where both keep raw samples (latency): a seeded bootstrap
  interval of the difference of the medians;
- else none (a single value per side, or fewer than ``MIN_REPEATS`` repeats a side): the delta
  is shown without an interval.

An interval is in the unit of its metric and always contains the metric's own point estimate:
a perplexity's interval is the paired NLL interval carried through exp(); a metric whose
recorded value contradicts the record's own per-example data or samples (an edited record) gets
no interval, and says so (slimbench.report.consistency).

A timed metric (latency, throughput, roofline fraction) of a record whose timings are not
trusted (slimbench.measure.trust: ``noisy``, ``under-sampled``; or, in a record that predates the
protocol's minimums, fewer than ``MIN_REPEATS`` repeats a side) is flagged: it gets no verdict.

``judge`` checks rules ``METRIC=TOL`` (TOL absolute, or relative with ``%``): a metric that got
worse by more than TOL, beyond its noise where an interval exists, is a regression; a flagged
or inconsistent metric is refused (neither pass nor fail) unless ``allow_noisy``.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimbench.measure.trust import is_timed, timing_trust
from slimbench.report import labels
from slimbench.report.consistency import mismatches
from slimbench.report.formatting import fmt
from slimbench.report.records import Loaded

MIN_REPEATS = 5  # repeats a side for an interval of timings from a record without a timing protocol


def like_key(rec: dict[str, Any]) -> tuple[str, ...]:
    """What must be equal for two cells to be compared."""
    m, t = rec["model"], rec["task"]
    return (
        str(m["name"]),
        str(m.get("revision")),
        labels.method_identity(rec),
        str(t["name"]),
        str(t.get("version")),
        json.dumps(t.get("params") or {}, sort_keys=True, default=str),
        labels.hardware_key(rec),
    )


KEY_FIELDS = (
    "model",
    "model revision",
    "method config and version",
    "task",
    "task version",
    "task parameters",
    "hardware class",
)


def loose_key(rec: dict[str, Any]) -> tuple[str, str, str]:
    """Model, method name, task name: cells a reader might expect to be compared."""
    return str(rec["model"]["name"]), str(rec["method"]["name"]), str(rec["task"]["name"])


@dataclass
class Delta:
    metric: str
    a: float
    b: float
    unit: str
    higher_better: bool
    noise: dict[str, Any] | None = None  # ci_low, ci_high, within_noise, how
    flag: str = ""  # a timing that is not a result: "noisy (B)", "under-sampled (A, B)", ...
    flag_why: str = ""
    inconsistent: str = ""  # the record contradicts its own data for this metric (no interval)
    no_noise_why: str = "one value per side"

    @property
    def delta(self) -> float:
        return self.b - self.a

    @property
    def relative(self) -> float:
        return self.delta / abs(self.a) if self.a else math.nan

    @property
    def worse(self) -> bool:
        return self.delta < 0 if self.higher_better else self.delta > 0

    @property
    def beyond_noise(self) -> bool:
        """A change that its interval says is real (False without an interval)."""
        return bool(self.noise) and not self.noise["within_noise"]

    @property
    def verdict(self) -> str:
        """worse / better (beyond noise), within noise, identical, changed (no interval), not judged, inconsistent."""
        if self.inconsistent:
            return "inconsistent record"
        if self.delta == 0:
            return "identical"
        if self.flag:
            return "not judged: " + self.flag.split(" (")[0] + " timing"
        if self.noise is None:
            return "changed, no noise estimate"
        if self.noise["within_noise"]:
            return "within noise"
        return "worse" if self.worse else "better"

    @property
    def significance(self) -> float:
        """How far beyond its noise a change is: |Δ| over the interval's half-width (else |Δ %|)."""
        if self.noise:
            half = (self.noise["ci_high"] - self.noise["ci_low"]) / 2
            return abs(self.delta) / half if half > 0 else math.inf
        return abs(self.relative) if math.isfinite(self.relative) else 0.0


@dataclass
class Pair:
    a: dict[str, Any]
    b: dict[str, Any]
    deltas: list[Delta]


@dataclass
class Comparison:
    pairs: list[Pair] = field(default_factory=list)
    only_a: list[dict[str, Any]] = field(default_factory=list)
    only_b: list[dict[str, Any]] = field(default_factory=list)
    not_comparable: list[tuple[dict, dict, list[str]]] = field(default_factory=list)
    failed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # ("A"/"B", failed record)
    sources: tuple[list[str], list[str]] = ([], [])
    problems: list[str] = field(default_factory=list)


def repeats_interval(
    sa: list[float], sb: list[float], n: int = 2000, seed: int = 0, minimum: int = 2
) -> dict[str, Any] | None:
    """Bootstrap interval of median(B) - median(A) from the raw repeats of each side (None below
    ``minimum`` repeats a side: a bootstrap of 2 vs 2 samples says nothing about noise)."""
    a, b = np.asarray(sa, dtype=float), np.asarray(sb, dtype=float)
    if a.size < max(2, minimum) or b.size < max(2, minimum):
        return None
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, (n, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, (n, b.size))], axis=1)
    lo, hi = np.quantile(mb - ma, [0.025, 0.975])
    return {
        "ci_low": float(lo),
        "ci_high": float(hi),
        "within_noise": bool(lo <= 0 <= hi),
        "how": f"spread of repeats ({a.size} vs {b.size} samples, 95% bootstrap of the median difference)",
    }


def paired_interval(a: dict, b: dict, metric: str, name: str, unit: str) -> dict[str, Any] | None:
    """The paired bootstrap interval of Δ ``name``, from the per-example ``metric`` of both records.

    ``name`` is the paired metric itself (its interval as is), or a perplexity over a per-example
    NLL (the interval carried through exp(): perplexity is exp of the mean NLL). For any other
    metric there is no interval in its own unit: None.
    """
    from slimbench.measure.stats import paired_delta_from_details

    if name != metric and not (metric == "nll" and unit == "ppl"):
        return None
    try:
        p = paired_delta_from_details(b.get("task_details") or {}, a.get("task_details") or {}, metric)
    except (ValueError, TypeError, KeyError):
        return None
    lo, hi = min(p["ci_low"], p["delta"]), max(p["ci_high"], p["delta"])  # the estimate inside its interval
    how = f"paired bootstrap over {p['n']} examples (Δ {metric} {fmt(p['delta'])}, 95% CI)"
    if name != metric:  # perplexity = exp(mean nll): carry the interval through exp, from A's mean
        base = math.log(float(a["metrics"][name]["value"]))
        lo, hi = math.exp(base + lo) - math.exp(base), math.exp(base + hi) - math.exp(base)
        how = f"paired bootstrap of Δ {metric} over {p['n']} examples through exp(), 95% CI"
    return {"ci_low": lo, "ci_high": hi, "within_noise": bool(lo <= 0 <= hi), "how": how}


def samples_of(m: dict[str, Any]) -> list[float] | None:
    s = m.get("samples")
    return s if isinstance(s, list) and all(isinstance(x, int | float) for x in s) else None


def timing_flag(a: dict, b: dict, xa: dict, xb: dict) -> tuple[str, str]:
    """(flag, why) of a timed metric neither side may be judged on; ("", "") when both are trusted."""
    sides = []
    for side, rec, m in (("A", a, xa), ("B", b, xb)):
        trust = timing_trust(rec)
        if not trust.trusted:
            sides.append((side, trust.label(), "; ".join(trust.reasons)))
        elif trust.sufficient is None and len(samples_of(m) or []) < MIN_REPEATS:
            n = len(samples_of(m) or [])
            sides.append((side, "under-sampled", f"{n} repeat(s), fewer than {MIN_REPEATS} (no timing protocol)"))
    if not sides:
        return "", ""
    labels_ = sorted({label for _, label, _ in sides})
    flag = " / ".join(f"{lb} ({', '.join(s for s, label, _ in sides if label == lb)})" for lb in labels_)
    if len(sides) == 1:
        return flag, sides[0][2]
    return flag, "; ".join(f"{s}: {why}" for s, _, why in sides if why)


def contains(noise: dict[str, Any], delta: float) -> bool:
    tol = 1e-9 * max(1.0, abs(delta))
    return noise["ci_low"] - tol <= delta <= noise["ci_high"] + tol


def metric_deltas(a: dict[str, Any], b: dict[str, Any]) -> list[Delta]:
    ma, mb = a.get("metrics") or {}, b.get("metrics") or {}
    paired = labels.paired_metric_of(a)
    bad_a, bad_b = mismatches(a), mismatches(b)
    out = []
    for name in sorted(set(ma) & set(mb)):
        xa, xb = ma[name], mb[name]
        if not (isinstance(xa, dict) and isinstance(xb, dict)):
            continue
        va, vb = xa.get("value"), xb.get("value")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (va, vb)):
            continue
        d = Delta(name, float(va), float(vb), str(xa.get("unit", "")), bool(xa.get("higher_is_better", False)))
        wrong = [f"{side}: {bad[name]}" for side, bad in (("A", bad_a), ("B", bad_b)) if name in bad]
        if wrong:
            d.inconsistent = "; ".join(wrong)
            d.no_noise_why = "the record contradicts its own data"
            out.append(d)
            continue
        if is_timed(name, xa):
            d.flag, d.flag_why = timing_flag(a, b, xa, xb)
        if paired:
            d.noise = paired_interval(a, b, paired, name, d.unit)
        sa, sb = samples_of(xa), samples_of(xb)
        if d.noise is None and sa is not None and sb is not None:
            d.noise = repeats_interval(sa, sb, minimum=MIN_REPEATS if is_timed(name, xa) else 2)
            if d.noise is None:
                d.no_noise_why = f"too few repeats for an interval ({len(sa)} vs {len(sb)})"
        if d.noise is not None and not contains(d.noise, d.delta):
            # The value is not what its samples say (e.g. edited): an interval that excludes its own
            # estimate would be a contradiction in print.
            d.inconsistent = (
                f"Δ {fmt(d.delta)} lies outside the interval [{fmt(d.noise['ci_low'])}, {fmt(d.noise['ci_high'])}] "
                "of its own samples"
            )
            d.noise, d.no_noise_why = None, "the record contradicts its own data"
        out.append(d)
    return out


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Which identity fields differ, in words (for cells that look alike but are not comparable)."""
    out = []
    for name, x, y in zip(KEY_FIELDS, like_key(a), like_key(b), strict=True):
        if x != y:
            if name == "method config and version":
                x, y = (
                    f"{labels.method_label(a)} v{labels.versions(a)}",
                    f"{labels.method_label(b)} v{labels.versions(b)}",
                )
            out.append(f"{name}: {x} vs {y}")
    return out


def compare(a: Loaded, b: Loaded) -> Comparison:
    out = Comparison(sources=(a.sources, b.sources), problems=a.problems + b.problems)
    ka = {like_key(r): r for r in a.ok}
    kb = {like_key(r): r for r in b.ok}
    for k, ra in ka.items():
        if k in kb:
            out.pairs.append(Pair(ra, kb[k], metric_deltas(ra, kb[k])))
    # A cell without its like on the other side, but with cells of the same model, method and
    # task there, is "not comparable" (with the fields that differ), not merely missing.
    for ra in (r for k, r in ka.items() if k not in kb):
        near = [rb for rb in kb.values() if loose_key(rb) == loose_key(ra)]
        out.not_comparable += [(ra, rb, differing(ra, rb)) for rb in near]
        if not near:
            out.only_a.append(ra)
    for rb in (r for k, r in kb.items() if k not in ka):
        near = [ra for ra in ka.values() if loose_key(ra) == loose_key(rb)]
        out.not_comparable += [(ra, rb, differing(ra, rb)) for ra in near if like_key(ra) in kb]
        if not near:
            out.only_b.append(rb)
    out.failed = [("A", r) for r in a.failed] + [("B", r) for r in b.failed]
    return out


def parse_rule(text: str) -> tuple[str, float, bool]:
    """``METRIC=TOL`` -> (metric, tolerance, relative). ``perplexity=2%`` or ``decode_tokens_per_s=5``.

    Raises ValueError with a message that names the rule once (the caller adds no prefix).
    """
    metric, sep, tol = text.partition("=")
    if not sep or not metric.strip() or not tol.strip():
        raise ValueError(f"--fail-if-worse expects METRIC=TOL (TOL a number, or a percentage like 2%), got {text!r}")
    relative = tol.strip().endswith("%")
    try:
        value = float(tol.strip().rstrip("%"))
    except ValueError:
        raise ValueError(f"--fail-if-worse {text!r}: tolerance {tol.strip()!r} is not a number") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"--fail-if-worse {text!r}: tolerance must be a finite number >= 0")
    return metric.strip(), value / 100 if relative else value, relative


def rule_matches(rule_metric: str, pair: Pair, d: Delta) -> bool:
    """``metric`` matches that metric of every task; ``task/metric`` only that task's."""
    task, _, metric = rule_metric.rpartition("/")
    return d.metric == metric and (not task or task == pair.a["task"]["name"])


def unknown_rules(cmp: Comparison, rules: list[str]) -> list[str]:
    """An error per rule that names no compared metric, with the closest names ("did you mean")."""
    known = sorted({d.metric for p in cmp.pairs for d in p.deltas})
    qualified = sorted({f"{p.a['task']['name']}/{d.metric}" for p in cmp.pairs for d in p.deltas})
    out = []
    for text in rules:
        metric, _, _ = parse_rule(text)
        if any(rule_matches(metric, p, d) for p in cmp.pairs for d in p.deltas):
            continue
        pool = qualified if "/" in metric else known
        close = difflib.get_close_matches(metric, pool, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        have = f" (compared metrics: {', '.join(known[:12])}{', ...' if len(known) > 12 else ''})" if known else ""
        out.append(
            f"--fail-if-worse {text}: no compared cell has metric {metric!r}, so nothing would be checked"
            f"{hint}{have if not close else ''}"
        )
    return out


@dataclass
class Judgement:
    regressions: list[str] = field(default_factory=list)  # worse than allowed, beyond noise
    refused: list[str] = field(default_factory=list)  # not judged: a noisy/under-sampled timing, an edited record
    judged: int = 0  # metric comparisons that passed or failed


def judge(cmp: Comparison, rules: list[str], *, allow_noisy: bool = False) -> Judgement:
    """Apply every rule to every compared metric it names."""
    out = Judgement()
    for text in rules:
        metric, tol, relative = parse_rule(text)
        allowed = f"{tol:.2%}" if relative else fmt(tol)
        hits = [(pair, d) for pair in cmp.pairs for d in pair.deltas if rule_matches(metric, pair, d)]
        for p, d in hits:
            if d.inconsistent:
                out.refused.append(
                    f"{cell_name(p.a)}: {d.metric}: the record contradicts its own data ({d.inconsistent})"
                )
                continue
            if d.flag and not allow_noisy:
                out.refused.append(
                    f"{cell_name(p.a)}: {d.metric} is a {d.flag} timing ({d.flag_why}): not a result, so neither a "
                    "pass nor a fail; measure again on an idle machine (or pass --allow-noisy to judge it anyway)"
                )
                continue
            out.judged += 1
            size = abs(d.relative) if relative else abs(d.delta)
            if d.worse and size > tol and not (d.noise and d.noise["within_noise"]):
                note = f"; judged on a {d.flag} timing (--allow-noisy)" if d.flag else ""
                out.regressions.append(
                    f"{cell_name(p.a)}: {d.metric} {fmt(d.a)} -> {fmt(d.b)} ({signed(d.delta)} {d.unit}, "
                    f"{signed(100 * d.relative)}%), worse than allowed {allowed}{note}"
                )
    return out


def cell_name(rec: dict[str, Any]) -> str:
    return f"{rec['model']['name']} | {labels.method_label(rec)} | {rec['task']['name']}@{rec['task'].get('version')}"


def signed(v: float) -> str:
    return ("+" if v > 0 else "") + fmt(v)
