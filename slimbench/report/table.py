"""The leaderboard as a table: one row per hardware x model x method config, quality and
efficiency as columns.

Quality columns are each task's quality metric, named with the task's protocol version (and
its parameters where several settings coexist), so only like is compared with like: a delta
is computed against the same model's `baseline` row, in the same column and the same
hardware section. Efficiency columns are named with their regime (batch, prompt, new tokens)
where a folder holds several. Simulated cells (masks, fake-quant) keep their measured latency
and memory but are marked `simulated`: their speed and memory are the dense model's.

A timing (latency, throughput, roofline fraction; never a size or memory) from a record that
slimbench.measure.trust does not trust (``noisy``: other processes took the cores;
``under-sampled``: fewer repeats or seconds than the task's protocol asks) keeps its value but
carries a flag per cell (``row["_flags"][column]``) that every output shows beside it, and plots
draw apart from the frontier.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from slimbench.measure.trust import interleaving, is_timed, roofline_denominator, roofline_errors, timing_trust
from slimbench.report import labels, serving
from slimbench.report.consistency import mismatches

# metric -> (column, scale, higher is better, x-axis words with unit); an efficiency v1 record
# has prefill_ms, decode_tokens_per_s and peak_memory_mb, version 2 adds the rest.
EFFICIENCY = {
    "ttft_ms": ("TTFT ms", 1.0, False, "time to first token (ms)"),
    "prefill_ms": ("prefill ms", 1.0, False, "prefill latency (ms)"),
    "decode ms/token": ("decode ms/token", 1.0, False, "decode latency (ms per step)"),
    "itl_p50_ms": ("ITL p50 ms", 1.0, False, "inter-token latency p50 (ms)"),
    "itl_p90_ms": ("ITL p90 ms", 1.0, False, "inter-token latency p90 (ms)"),
    "itl_p99_ms": ("ITL p99 ms", 1.0, False, "inter-token latency p99 (ms)"),
    "decode_tokens_per_s": ("decode tok/s", 1.0, True, "decode throughput (tokens/s, all sequences)"),
    "e2e_tokens_per_s": ("e2e tok/s", 1.0, True, "end-to-end throughput (tokens/s)"),
    "peak_memory_mb": ("peak mem MiB", 1.0, False, "peak memory during inference (MiB)"),
    "memory_weights_mb": ("weights MiB", 1.0, False, "weight memory (MiB)"),
    "memory_kv_mb": ("KV MiB", 1.0, False, "KV-cache memory (MiB)"),
    "memory_runtime_mb": ("runtime MiB", 1.0, False, "runtime memory (MiB)"),
    "memory_other_mb": ("other mem MiB", 1.0, False, "other memory (MiB)"),
    "kv_cache_bytes_logical": ("KV logical MB", 1e-6, False, "KV cache, logical (MB)"),
    "kv_cache_bytes_physical": ("KV physical MB", 1e-6, False, "KV cache, physical (MB)"),
    "decode_roofline_fraction": ("decode roofline", 1.0, True, "decode, fraction of the roofline"),
    "prefill_roofline_fraction": ("prefill roofline", 1.0, True, "prefill, fraction of the roofline"),
}
# Shown in Markdown/LaTeX and by default in HTML; the rest are in the CSV and one click away.
MAIN_EFFICIENCY = ("TTFT ms", "prefill ms", "decode ms/token", "decode tok/s", "peak mem MiB")
FLAGS = "timing flags"  # the column naming each row's untrusted timings and why
# The derived decode latency is a timing like the metrics it comes from.
DERIVED_TIMED = frozenset({"decode ms/token"})
SIZE_COLUMNS = {  # column -> (method_report key, scale)
    "stored MB": ("stored_bytes", 1e-6),
    "eff. bits": ("effective_bits", 1.0),
    "params M": ("parameters", 1e-6),
    "sparsity": ("sparsity", 1.0),
    "compress s": ("compress_seconds", 1.0),
}


@dataclass
class QualityColumn:
    col: str  # column label, e.g. "perplexity@concat-windows/1"
    task: str
    metric: str
    higher_better: bool
    unit: str
    protocol: str
    paired: str | None = None  # per-example metric the noise column pairs
    paired_unit: str = ""

    @property
    def delta(self) -> str:
        return f"Δ {self.col}"

    @property
    def noise(self) -> str:
        unit = f", {self.paired_unit}" if self.paired_unit else ""
        return f"noise {self.col} (paired Δ {self.paired}{unit}, 95% CI)"


@dataclass
class EfficiencyColumn:
    col: str
    metric: str
    regime: tuple[int, int, int] | None
    higher_better: bool
    axis: str  # x-axis words with unit

    @property
    def main(self) -> bool:
        return self.col.split(" [")[0] in MAIN_EFFICIENCY


@dataclass
class Leaderboard:
    df: pd.DataFrame
    quality: list[QualityColumn]
    efficiency: list[EfficiencyColumn]
    regimes: list[tuple[int, int, int]] = field(default_factory=list)
    serving: list[str] = field(default_factory=list)  # max req/s within the SLO, per server and SLO

    def columns(self, *, all_efficiency: bool = False) -> list[str]:
        """Display order: identity, quality with Δ and noise, size, efficiency, flags."""
        df = self.df
        cols = ["model", "method", "execution"]
        for q in self.quality:
            cols += [q.col, q.delta] + ([q.noise] if df[q.noise].astype(bool).any() else [])
        cols += [c for c in SIZE_COLUMNS if c in df and df[c].notna().any()]
        cols += [e.col for e in self.efficiency if (all_efficiency or e.main) and df[e.col].notna().any()]
        cols += [c for c in self.serving if c in df and df[c].notna().any()]
        cols += [c for c in (FLAGS, "warnings") if df[c].astype(bool).any()]
        return cols

    def flag(self, row: pd.Series, col: str) -> str:
        """'noisy', 'under-sampled' or '' for one cell of the table."""
        return row["_flags"].get(col, "") if isinstance(row.get("_flags"), dict) else ""

    def note(self, row: pd.Series, col: str) -> str:
        """What to read with a value besides a flag ('rounded to zero' for a quantizer's sparsity), or ''."""
        return self.flag(row, col) or (row["_notes"].get(col, "") if isinstance(row.get("_notes"), dict) else "")

    def flagged_columns(self) -> list[str]:
        return [c for c in self.df.columns if self.df["_flags"].map(lambda f, c=c: c in f).any()]


def number(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def metric_value(rec: dict[str, Any], name: str) -> float:
    m = (rec.get("metrics") or {}).get(name)
    return number(m.get("value")) if isinstance(m, dict) else math.nan


def metric_unit(recs: list[dict[str, Any]], name: str) -> str:
    for r in recs:
        m = (r.get("metrics") or {}).get(name)
        if isinstance(m, dict) and m.get("unit"):
            return str(m["unit"])
    return ""


def quality_columns(records: list[dict[str, Any]]) -> dict[str, QualityColumn]:
    """task key -> its quality column, adding parameters to the label only where needed."""
    by_version: dict[str, set[str]] = defaultdict(set)
    for r in records:
        t = r["task"]
        by_version[f"{t['name']}@{t.get('version')}"].add(labels.task_key(r))
    out: dict[str, QualityColumn] = {}
    for r in records:
        key, t = labels.task_key(r), r["task"]
        q = labels.quality_metric_of(r)
        if key in out or not q:
            continue
        base = f"{t['name']}@{t.get('version')}"
        if len(by_version[base]) > 1:
            varying = varying_params(records, t["name"], t.get("version"))
            base += "[" + ",".join(f"{k}={(t.get('params') or {}).get(k)}" for k in varying) + "]"
        same = [x for x in records if labels.task_key(x) == key]
        higher = next(
            (m["higher_is_better"] for x in same if isinstance(m := (x.get("metrics") or {}).get(q), dict)), False
        )
        paired = labels.paired_metric_of(r)
        out[key] = QualityColumn(
            col=base if q == t["name"] else f"{base} {q}",
            task=t["name"],
            metric=q,
            higher_better=bool(higher),
            unit=metric_unit(same, q),
            protocol=labels.protocol(r),
            paired=paired,
            paired_unit=metric_unit(same, paired) if paired else "",
        )
    return out


def varying_params(records: list[dict], name: str, version: Any) -> list[str]:
    values: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r["task"]["name"] == name and r["task"].get("version") == version:
            for k, v in (r["task"].get("params") or {}).items():
                values[k].add(json.dumps(v, sort_keys=True, default=str))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def efficiency_values(rec: dict[str, Any]) -> dict[str, float]:
    """Efficiency metric -> value (scaled), with decode latency per step derived where needed."""
    out = {m: metric_value(rec, m) * scale for m, (_, scale, _, _) in EFFICIENCY.items() if m != "decode ms/token"}
    out = {k: v for k, v in out.items() if not math.isnan(v)}
    reg = labels.regime(rec)
    batch = reg[2] if reg else 1
    if "itl_p50_ms" in out:
        out["decode ms/token"] = out["itl_p50_ms"]
    elif out.get("decode_tokens_per_s", 0) > 0:  # tokens/s counts every sequence of the batch
        out["decode ms/token"] = 1e3 * batch / out["decode_tokens_per_s"]
    return out


def efficiency_columns(records: list[dict[str, Any]]) -> tuple[dict[tuple, EfficiencyColumn], list[tuple]]:
    regimes = sorted(
        {reg for r in records if (reg := labels.regime(r)) and efficiency_values(r)}, key=lambda x: (x[2], x[0], x[1])
    )
    cols: dict[tuple, EfficiencyColumn] = {}
    for reg in regimes or [None]:
        for metric, (col, _, higher, axis) in EFFICIENCY.items():
            suffix = f" [{labels.regime_label(reg)}]" if reg and len(regimes) > 1 else ""
            cols[(reg, metric)] = EfficiencyColumn(col + suffix, metric, reg, higher, axis)
    return cols, regimes


def build(records: list[dict[str, Any]]) -> Leaderboard:
    """Rows from ok records; Δ and paired noise against each model's baseline."""
    qcols = quality_columns(records)
    ecols, regimes = efficiency_columns(records)
    identities: dict[str, set[str]] = defaultdict(set)
    for r in records:
        identities[labels.method_label(r)].add(labels.method_identity(r))
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        label = labels.method_label(r)
        if len(identities[label]) > 1:  # same settings, another method version: keep them apart
            label += f" v{labels.versions(r)}"
        key = (labels.hardware_key(r), r["model"]["name"], labels.method_identity(r))
        row = rows.get(key) or rows.setdefault(key, new_row(r, key[0], label))
        absorb(row, r, qcols, ecols)
    scols = serving.fill(rows, records)
    df = pd.DataFrame(list(rows.values()))
    for c in [e.col for e in ecols.values()] + [q.col for q in qcols.values()]:
        if c not in df:
            df[c] = math.nan
    quality = sorted(qcols.values(), key=lambda q: q.col)
    df = add_deltas(df, quality)
    df = df.sort_values(["hardware", "model", "_order", "method"]).reset_index(drop=True)
    used = [e for e in ecols.values() if df[e.col].notna().any()]
    return Leaderboard(df, quality, used, regimes, scols)


def new_row(r: dict[str, Any], hw: str, label: str) -> dict[str, Any]:
    rep = r.get("method_report") or {}
    row: dict[str, Any] = {
        "hardware": hw,
        "model": r["model"]["name"],
        "method": label,
        "method_name": r["method"]["name"],
        "family": labels.family(r),
        "execution": str(rep.get("execution", "?")),
        FLAGS: "",
        "warnings": "; ".join(str(w) for w in rep.get("warnings") or []),
        "_order": 0 if r["method"]["name"] == "baseline" else 1,
        "_cells": [],
        "_details": {},
        "_flags": {},  # column -> "noisy" / "under-sampled"
        "_flag_reasons": {},  # regime label -> why its timings are not trusted
        "_interleaving": {},  # regime label -> how its timings were taken (interleaved or alone, why)
        "_denominators": {},  # roofline column -> the limit it divides by, in words
        "_errors": [],  # measurement errors the task refused to report as values (roofline > 1)
        "_notes": {},  # column -> a few words read with the value ("rounded to zero")
        "_inconsistent": {},  # noise column -> why the record's value contradicts its own data
    }
    for col, (k, scale) in SIZE_COLUMNS.items():
        row[col] = number(rep.get(k)) * scale
    if row["sparsity"] > 0 and "pruning" not in row["family"].split("+"):
        # Exact zeros a quantizer (or a factorization) made: not pruning, and no sparse kernel uses them.
        row["_notes"]["sparsity"] = "rounded to zero"
    return row


def absorb(row: dict[str, Any], r: dict[str, Any], qcols: dict, ecols: dict) -> None:
    """Add one cell's values to its row."""
    row["_cells"].append(r)
    details = r.get("task_details") or {}
    q = qcols.get(labels.task_key(r))
    if q is not None and not math.isnan(v := metric_value(r, q.metric)):
        row[q.col] = v
        row["_details"][q.col] = details
        wrong = mismatches(r)
        if q.metric in wrong:  # an edited value: its per-example data cannot vouch for it
            why = f"no interval: {q.metric} contradicts its per-example data ({wrong[q.metric]})"
            row["_inconsistent"][q.noise] = why
    values = efficiency_values(r)
    if not values:
        return
    reg = labels.regime(r)
    where = labels.regime_label(reg) if reg else "efficiency"
    trust = timing_trust(r)
    metrics = r.get("metrics") or {}
    for metric, v in values.items():
        col = ecols.get((reg, metric)) or ecols.get((None, metric))
        if col is None:
            continue
        row[col.col] = v
        timed = metric in DERIVED_TIMED or is_timed(metric, metrics.get(metric))
        if timed and not trust.trusted:
            row["_flags"][col.col] = trust.label()
        if metric.endswith("_roofline_fraction") and (den := roofline_denominator(r, metric)):
            row["_denominators"][col.col] = den
    if not trust.trusted:
        why = "; ".join(trust.reasons) or "flagged by the task"
        row["_flag_reasons"][where] = f"{trust.label()}: {why}"
        row[FLAGS] = "; ".join(f"{k}: {v}" for k, v in row["_flag_reasons"].items())
    done, text = interleaving(r)
    if done is not None:
        info = (r.get("task_details") or {}).get("interleaving") or {}
        peers = [str(x) for x in info.get("labels") or []] if done else []
        # cells measured together say so once: the group is the row and its peers
        group = tuple(sorted({row["method"], *peers})) if done else (text,)
        rounds = f"{info.get('rounds')} rounds, {info.get('order')}" if done else ""
        row["_interleaving"][where] = {"done": done, "text": text, "group": group, "rounds": rounds}
    row["_errors"] += [f"{where}: {e}" for e in roofline_errors(r)]


def paired_noise(details: Any, base: Any, metric: str | None) -> dict[str, Any] | None:
    """Paired bootstrap interval of the per-example difference, where both records have one."""
    from slimbench.measure.stats import paired_delta_from_details

    if not metric or not isinstance(details, dict) or not isinstance(base, dict):
        return None
    try:
        return paired_delta_from_details(details, base, metric)
    except (ValueError, TypeError, KeyError):  # no per-example scores, or different examples
        return None


def noise_text(p: dict[str, Any], metric: str | None, unit: str) -> str:
    from slimbench.report.formatting import fmt

    lo, hi = min(p["ci_low"], p["delta"]), max(p["ci_high"], p["delta"])  # the estimate inside its interval
    verdict = "≈ noise" if lo <= 0 <= hi else "significant"
    u = f" {unit}" if unit else ""
    return f"{verdict} (paired Δ {metric} {fmt(p['delta'])}{u}, 95% CI [{fmt(lo)}, {fmt(hi)}])"


def add_deltas(df: pd.DataFrame, quality: list[QualityColumn]) -> pd.DataFrame:
    """Δ vs the same model's baseline on the same hardware; paired noise where both keep per-example scores."""
    for q in quality:
        deltas, notes = [], []
        for _, row in df.iterrows():
            base = df[(df.hardware == row.hardware) & (df.model == row.model) & (df.method_name == "baseline")]
            b = base[q.col].iloc[0] if len(base) else math.nan
            has = pd.notna(row[q.col]) and pd.notna(b)
            deltas.append(row[q.col] - b if has else math.nan)
            p = None
            wrong = row["_inconsistent"].get(q.noise)
            if not wrong and len(base):
                wrong = base["_inconsistent"].iloc[0].get(q.noise)
            if has and row.method_name != "baseline" and not wrong:
                p = paired_noise(row["_details"].get(q.col), base["_details"].iloc[0].get(q.col), q.paired)
            notes.append(wrong if wrong and has else ("" if p is None else noise_text(p, q.paired, q.paired_unit)))
        df[q.delta] = deltas
        df[q.noise] = notes
    return df
