"""Reports: leaderboard (Markdown and CSV) and Pareto plots from stored records.

A row is one model x method config on one hardware setting. Quality columns are each
task's quality metric, named with the task's protocol version (and its parameters where
several settings coexist), so only like is compared with like: a delta is computed against
the same model's `baseline` row, in the same column (same task version and parameters) and
the same hardware section. Simulated cells (masks, fake-quant) keep their measured latency
and memory, but are marked `simulated` in every table and drawn hollow in every plot: their
speed and memory are the dense model's, not a compressed one's.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from slimbench.registry import TASKS
from slimbench.store import ResultStore, atomic_write_text

EFFICIENCY_COLUMNS = {  # metric -> (column, scale)
    "prefill_ms": ("prefill ms", 1.0),
    "decode_tokens_per_s": ("decode tok/s", 1.0),
    "peak_memory_mb": ("peak mem MiB", 1.0),
}
X_AXES = {  # pareto x-axis column -> (label, lower is better)
    "stored MB": "stored size (MB, real bytes of the saved format)",
    "decode ms/token": "decode latency (ms per token, batch 1)",
    "prefill ms": "prefill latency (ms)",
    "peak mem MiB": "peak memory during inference (MiB)",
}


@dataclass
class ReportOutput:
    folder: Path
    files: list[Path]
    summary: str


def hardware_key(rec: dict) -> str:
    hw = rec["hardware"]
    cpu = rec.get("environment", {}).get("gpu") or rec.get("environment", {}).get("cpu", "?")
    return f"{hw['device']}/{hw['dtype']}/{hw['threads']} threads ({cpu})"


def quality_metric(task_name: str) -> str | None:
    return TASKS.get(task_name).quality_metric if task_name in TASKS else None


def paired_metric(task_name: str) -> str | None:
    task = TASKS.get(task_name) if task_name in TASKS else None
    return (task.paired_metric or task.quality_metric) if task else None


def task_columns(records: list[dict]) -> dict[str, str]:
    """Map (task name, version, params) -> column label, adding params only where needed."""
    by_version: dict[str, set[str]] = defaultdict(set)
    for r in records:
        t = r["task"]
        by_version[f"{t['name']}@{t['version']}"].add(repr(sorted(t["params"].items())))
    labels = {}
    for r in records:
        t = r["task"]
        base = f"{t['name']}@{t['version']}"
        key = base + repr(sorted(t["params"].items()))
        if len(by_version[base]) == 1:
            labels[key] = base
        else:
            varying = varying_params(records, t["name"], t["version"])
            labels[key] = base + "[" + ",".join(f"{k}={t['params'].get(k)}" for k in varying) + "]"
    return labels


def varying_params(records: list[dict], name: str, version: str) -> list[str]:
    values: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r["task"]["name"] == name and r["task"]["version"] == version:
            for k, v in r["task"]["params"].items():
                values[k].add(repr(v))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def build_rows(records: list[dict]) -> pd.DataFrame:
    """One row per (hardware, model, method config), quality and efficiency as columns."""
    labels = task_columns(records)
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (hardware_key(r), r["model"]["name"], r["method"]["label"])
        rep = r.get("method_report") or {}
        row = rows.setdefault(
            key,
            {
                "hardware": key[0],
                "model": key[1],
                "method": key[2],
                "method_name": r["method"]["name"],
                "execution": rep.get("execution", "?"),
                "stored MB": rep.get("stored_bytes", math.nan) / 1e6,
                "eff. bits": rep.get("effective_bits", math.nan),
                "params M": rep.get("parameters", math.nan) / 1e6,
                "sparsity": rep.get("sparsity", math.nan),
                "compress s": rep.get("compress_seconds", math.nan),
            },
        )
        t = r["task"]
        label = labels[f"{t['name']}@{t['version']}" + repr(sorted(t["params"].items()))]
        q = quality_metric(t["name"])
        if q and q in r["metrics"]:
            m = r["metrics"][q]
            col = label if q == t["name"] else f"{label} {q}"
            row[col] = m["value"]
            row.setdefault("_quality", {})[col] = m["higher_is_better"]
            row.setdefault("_details", {})[col] = (paired_metric(t["name"]), r.get("task_details") or {})
        for metric, (col, scale) in EFFICIENCY_COLUMNS.items():
            if metric in r["metrics"]:
                row[col] = r["metrics"][metric]["value"] * scale
        if "decode_tokens_per_s" in r["metrics"]:
            row["decode ms/token"] = 1e3 / r["metrics"]["decode_tokens_per_s"]["value"]
    return pd.DataFrame(list(rows.values()))


def paired_noise(row_details: Any, base_details: Any, col: str) -> dict[str, Any] | None:
    """Paired bootstrap interval of the per-example difference, where both records have one."""
    from slimbench.stats import paired_delta_from_details

    if not isinstance(row_details, dict) or not isinstance(base_details, dict) or col not in row_details:
        return None
    metric, details = row_details[col]
    _, base = base_details.get(col, (None, None))
    if not metric or not base:
        return None
    try:
        return paired_delta_from_details(details, base, metric)
    except ValueError:  # no per-example scores, or different examples: no paired interval
        return None


def add_deltas(df: pd.DataFrame, quality_cols: list[str]) -> pd.DataFrame:
    """Δ vs the same model's baseline on the same hardware, for each quality column.

    Where both records keep per-example scores, the difference is also paired example by
    example with a 95% bootstrap interval; `≈` marks a delta whose interval contains zero.
    """
    for col in quality_cols:
        deltas, notes = [], []
        for _, row in df.iterrows():
            base = df[(df.hardware == row.hardware) & (df.model == row.model) & (df.method_name == "baseline")]
            b = base[col].iloc[0] if len(base) and col in base else math.nan
            has = pd.notna(row.get(col)) and pd.notna(b)
            deltas.append(row[col] - b if has else math.nan)
            paired = None
            if has and row.method_name != "baseline" and "_details" in df:
                paired = paired_noise(row["_details"], base["_details"].iloc[0], col)
            notes.append(
                ""
                if paired is None
                else ("≈ noise" if paired["within_noise"] else "significant")
                + f" (paired Δ {fmt(paired['delta'])}, 95% CI [{fmt(paired['ci_low'])}, {fmt(paired['ci_high'])}])"
            )
        df[f"Δ {col}"] = deltas
        df[f"noise {col}"] = notes
    return df


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def markdown_table(df: pd.DataFrame, cols: list[str]) -> str:
    # Names come from user configs; escape the characters that would break a Markdown table.
    def cell(v: Any) -> str:
        return html.escape(fmt(v)).replace("|", "\\|")

    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join([head, sep, *body])


def pareto_front(xs: list[float], ys: list[float], higher_y_better: bool) -> list[int]:
    """Indices of points no other point beats on both axes (x lower, y better)."""
    pts = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i] if higher_y_better else ys[i]))
    front, best = [], -math.inf if higher_y_better else math.inf
    for i in pts:
        better = ys[i] > best if higher_y_better else ys[i] < best
        if better:
            front.append(i)
            best = ys[i]
    return front


def plot_pareto(df: pd.DataFrame, qcol: str, higher_better: bool, xcol: str, path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[df[qcol].notna() & df[xcol].notna()] if xcol in df else df.iloc[0:0]
    if len(sub) < 2:
        return False
    xs, ys = sub[xcol].tolist(), sub[qcol].tolist()
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, (_, r) in enumerate(sub.iterrows()):
        sim = r["execution"] == "simulated"
        ax.scatter(
            xs[i],
            ys[i],
            s=60,
            facecolors="none" if sim else "C0",
            edgecolors="C3" if sim else "C0",
            linewidths=1.5,
            zorder=3,
        )
        ax.annotate(
            r["method"] + (" (simulated)" if sim else ""),
            (xs[i], ys[i]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = pareto_front(xs, ys, higher_better)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="C2", label="Pareto frontier", zorder=2)
    ax.scatter([], [], facecolors="C0", edgecolors="C0", label="native")
    ax.scatter([], [], facecolors="none", edgecolors="C3", label="simulated (dense masks / fake-quant)")
    if not higher_better and max(ys) / max(min(ys), 1e-9) > 20:
        ax.set_yscale("log")
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel(X_AXES[xcol])
    ax.set_ylabel(qcol + (" (higher is better)" if higher_better else " (lower is better)"))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")  # keep labels of points near the edges
    plt.close(fig)
    tmp.replace(path)
    return True


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")[:80]


def write_report(store: ResultStore, out: Path) -> ReportOutput:
    everything = store.records(include_failed=True)  # one pass over the files
    records = [r for r in everything if r.get("status") == "ok"]
    failed = [r for r in everything if r.get("status") != "ok"]
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        atomic_write_text(out / "leaderboard.md", "# SlimBench leaderboard\n\nNo ok records yet.\n")
        return ReportOutput(out, [out / "leaderboard.md"], "no ok records to report")
    df = build_rows(records)
    qflags: dict[str, bool] = {}
    for d in df.get("_quality", pd.Series(dtype=object)).dropna():
        qflags.update(d)
    qcols = sorted(qflags)
    df = add_deltas(df, qcols)
    df = df.drop(columns=["_quality", "_details"], errors="ignore")
    df = df.sort_values(["hardware", "model", "method_name", "method"]).reset_index(drop=True)
    cols = ["model", "method", "execution"]
    for q in qcols:
        cols += [q, f"Δ {q}"] + ([f"noise {q}"] if df[f"noise {q}"].astype(bool).any() else [])
    cols += [
        c
        for c in (
            "stored MB",
            "eff. bits",
            "params M",
            "sparsity",
            "prefill ms",
            "decode tok/s",
            "peak mem MiB",
            "compress s",
        )
        if c in df
    ]
    files = []
    csv_path = out / "leaderboard.csv"
    atomic_write_text(csv_path, df.to_csv(index=False))
    files.append(csv_path)
    md = [
        "# SlimBench leaderboard",
        "",
        "Δ = value minus the same model's `baseline` on the same hardware and task protocol. "
        "`simulated` rows hold masks or fake-quant values in a dense model: their latency and memory "
        "are the dense model's, and they claim no speed-up.",
        "",
    ]
    for hw, sec in df.groupby("hardware", sort=False):
        md += [f"## {hw}", "", markdown_table(sec, cols), ""]
        for model, msec in sec.groupby("model", sort=False):
            for q in qcols:
                for xcol in X_AXES:
                    png = out / f"pareto_{slug(model)}_{slug(hw.split(' (')[0])}_{slug(q)}_vs_{slug(xcol)}.png"
                    if plot_pareto(msec, q, qflags[q], xcol, png, f"{model}: {q} vs {xcol}\n{hw}"):
                        files.append(png)
                        md.append(f"![{html.escape(model)}: {html.escape(q)} vs {xcol}]({png.name})")
        md.append("")
    if failed:
        md += ["## Failed cells", "", "| model | method | task | stage | error |", "|---|---|---|---|---|"]
        for r in failed:
            e = r.get("error") or {}
            msg = html.escape(f"{e.get('type')}: {e.get('message', '')}"[:200]).replace("|", "\\|").replace("\n", " ")
            md.append(
                f"| {html.escape(r['model']['name'])} | {html.escape(r['method']['label'])} | "
                f"{html.escape(r['task']['name'])} | {e.get('stage')} | {msg} |"
            )
    md_path = out / "leaderboard.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    files.insert(0, md_path)
    summary_cols = [
        c
        for c in cols
        if c in ("model", "method", "execution", "stored MB", "decode tok/s") or c in qcols or c.startswith("Δ ")
    ]
    summary = df[summary_cols].to_string(index=False, float_format=lambda v: fmt(float(v)))
    summary += f"\n\nreport: {md_path} ({len(files) - 2} plots)"
    if failed:
        summary += f"; {len(failed)} failed record(s) listed there"
    return ReportOutput(out, files, summary)
